"""Recipe configs: `python -m train --config configs/<recipe>.py[:variant]`; each file's get_config(variant)."""
