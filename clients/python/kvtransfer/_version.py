"""The client's version (``hello``'s ``client`` field is ``kvtransfer-python/<version>``)."""

__version__ = "0.1.0"
