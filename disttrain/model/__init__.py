from disttrain.model.llama import DecoderLayer, Llama, build_model

__all__ = ["DecoderLayer", "Llama", "build_model"]
