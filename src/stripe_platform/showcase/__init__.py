"""The showcase, not library: the main job (`stripe-platform demo`) and the brief's own example
records it loads (brief_examples.py). Nothing in the platform's packages imports it."""
