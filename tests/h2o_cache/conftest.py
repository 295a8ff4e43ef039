import torch

# Tiny models spend their time in small ops, where a second OpenMP thread only adds synchronisation.
torch.set_num_threads(1)
