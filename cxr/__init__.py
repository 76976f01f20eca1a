"""The root ``cxr`` command (every package's CLI mounted as one) and the demo; the top of the import graph."""
