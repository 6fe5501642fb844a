"""The stock E2B SDKs as our features use them: ``config.py`` says where sandboxes live (self-hosted
or cloud) and is the only place that builds SDK options."""
