"""Training: the composition root ``train.run`` (config -> data, network, LightningModule, Trainer, MLflow run),
the LightningModules of each task, the losses and transfer from pretrained or logged weights."""
