from pockengine.backend.choice import BACKENDS, Choice, select
from pockengine.backend.cuda_graphs import CudaGraphProgram
from pockengine.backend.inductor import InductorProgram
from pockengine.backend.torch_codegen import CompiledProgram

__all__ = ["BACKENDS", "Choice", "CompiledProgram", "CudaGraphProgram", "InductorProgram", "select"]
