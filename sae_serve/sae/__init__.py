"""What an SAE is (model.py), how its files look (formats.py), and what is known about its
features (features.py). Import from those modules; this package adds nothing of its own."""
