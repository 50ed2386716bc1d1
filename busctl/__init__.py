"""busctl: the command line and Python client for the busd daemon."""
