"""posttrain: LLM post-training as config files."""
__version__ = "0.1.0"
