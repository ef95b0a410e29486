"""Studies of several training runs under one MLflow parent: cross-validation, cross-site, seed repeats, and the
launcher that runs each child as its own ``medseg train`` process."""
