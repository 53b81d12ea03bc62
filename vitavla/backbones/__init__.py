from vitavla.backbones.internvl import InternVLBackbone, paper_internvl_config
from vitavla.backbones.llava import HFVLMBackbone, LlavaBackbone
from vitavla.backbones.vita import VITABackbone
