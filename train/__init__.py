"""`python -m train --config configs/<recipe>.py`: the command line over jaxdiff.training."""
