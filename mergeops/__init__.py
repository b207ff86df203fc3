"""mergeops: continual model merging with governance."""

__version__ = "0.1.0"
