"""`stego view`: a local web page to see, name and merge the clusters of a RESULTS folder."""
