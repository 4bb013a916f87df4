"""Rounds on the server: when a round may close (`gate`)."""
