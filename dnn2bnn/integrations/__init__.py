"""Integrations with training frameworks; each submodule imports its framework on import.

Importing :mod:`dnn2bnn` never imports them (nor the frameworks):

- :mod:`dnn2bnn.integrations.transformers`: Hugging Face ``Trainer`` fine-tuning with the
  ELBO (:class:`~dnn2bnn.integrations.transformers.BayesTrainer`), Monte Carlo evaluation,
  and ``save_pretrained``/``from_pretrained`` of converted models.
- :mod:`dnn2bnn.integrations.lightning`: a ``LightningModule`` that trains a converted
  network with the ELBO and evaluates it with Monte Carlo predictions
  (:class:`~dnn2bnn.integrations.lightning.BayesLightningModule`), DDP included.
"""

__all__: list[str] = []
