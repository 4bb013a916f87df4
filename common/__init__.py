"""Code shared by the server, the aggregator and the clients. Never imports a role package."""

import logging as _logging

# peft imports torchao when it is installed (for --client-quantization); torchao then warns at import about its
# CUDA-only kernel libraries on a CPU build, and torch about torchao's enum registrations: noise for every role
for _noisy in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_noisy).setLevel(_logging.ERROR)
