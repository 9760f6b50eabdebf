"""The JSON API: thin views over ``media_app.uploads`` and ``media_app.selectors``."""
