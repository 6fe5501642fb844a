"""filesystem.Filesystem: stat, list, make, move, remove and watch paths."""
