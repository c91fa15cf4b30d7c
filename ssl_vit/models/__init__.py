from .vit import ARCHS, VisionTransformer, create_encoder, sincos_2d_pos_embed

__all__ = ["ARCHS", "VisionTransformer", "create_encoder", "sincos_2d_pos_embed"]
