"""Models in and out of jaxnmt: CTranslate2 export (`ctranslate2.py`), Marian / OPUS-MT
import (`marian.py`), and what both share (`weights.py`: parameters by name, and a
workdir born from given weights)."""
