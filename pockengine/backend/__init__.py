from pockengine.backend.torch_codegen import CompiledProgram

__all__ = ["CompiledProgram"]
