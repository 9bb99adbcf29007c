"""Reading and writing frames (FITS, camera raw): the only place that knows file formats."""
