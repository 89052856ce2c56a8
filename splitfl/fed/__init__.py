"""Federated averaging across hospitals: FedAvg/FedProx, DP-SGD, and secure aggregation.

Each site trains a full copy of the model on its own images for a few local
epochs; the server combines the updates. Secure variants keep individual
updates from the server: CKKS-encrypted aggregation (:mod:`splitfl.he.aggregation`)
and pairwise-mask secure aggregation (:mod:`splitfl.fed.secagg`).
"""
