"""veiltrain: train on secret shares, reconstruct only on the owner."""
