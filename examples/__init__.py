"""Runnable examples: the models RNN users start from, on real data that ships in packages, each with
``--backend torch`` (torch.nn) or any fastrnn backend. ``make examples`` runs them with default settings."""
