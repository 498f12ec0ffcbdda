"""The core: the model's parameters, the workspace, the compiled kernels and the public functions.

``model`` (parameters in one flat buffer), ``workspace`` (preallocated buffers), ``api``
(``loss_and_grad``, ``forward``, ``backward``: validate, then call the kernels), ``kernels``
(the ``@njit`` code), ``threads`` (BLAS and Numba threads), ``validation`` (the argument checks
shared by the package), ``reference`` and ``reference_cells`` (the plain NumPy oracles).
"""
