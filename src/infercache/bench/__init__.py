"""Load generation and reports for infercache servers (``infercache bench``)."""
