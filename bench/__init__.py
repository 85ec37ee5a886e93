"""edgepack.bench"""
