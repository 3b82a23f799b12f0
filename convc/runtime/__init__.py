"""Build generated C into shared libraries (cached) and run them."""
