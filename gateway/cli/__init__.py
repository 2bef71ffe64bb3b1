"""The `icgate` command line (`main.py`); its training and replay commands live beside it."""
