"""edgepack.tune"""
