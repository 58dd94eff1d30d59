"""Graph passes: each is a small class whose constructor takes options and whose ``call(model)`` reports."""
