"""What happens to a stored object: header rules first (rules.py), then the model through the inference
engine (classifier.py), with shadow mode recording the model's decision beside the site's (shadow.py)."""
