"""Rounds on the server: when a round may close (`gate`) and the one owner of round state (`coordinator`)."""
