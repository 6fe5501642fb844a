"""envd: the in-sandbox daemon (placeholder, filled in next commits)."""
