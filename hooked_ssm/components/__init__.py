"""Model components, one per file, each declaring its hook points next to the code that fires them."""
