from pockengine.backend.choice import BACKENDS, Choice, select
from pockengine.backend.inductor import InductorProgram
from pockengine.backend.torch_codegen import CompiledProgram

__all__ = ["BACKENDS", "Choice", "CompiledProgram", "InductorProgram", "select"]
