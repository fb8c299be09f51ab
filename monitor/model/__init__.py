"""Model: the declared data model and the converters from Microsoft objects to graph items."""
