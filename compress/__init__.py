"""edgepack.compress"""
