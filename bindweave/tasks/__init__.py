"""Tasks built on the framework, kept apart from the core (nothing in the core imports them)."""
