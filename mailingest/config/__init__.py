"""The one settings object, read from the environment once and validated at start-up."""
