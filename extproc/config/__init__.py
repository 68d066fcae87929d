"""The input vocabulary: what extproc reads, before any engine compiles it. Layer: vocabulary.

* `models.py`: typed resource models with Istio's field names (`StrictModel` is their base)
* `validation.py`: istiod's semantic validation, naming the offending field
* `errors.py`: located errors (file, document, field) and `pydantic_issues`
* `yamlsource.py`: multi-document YAML that remembers the line of every value
* `providers.py`: MeshConfig extensionProviders resolved for CUSTOM calls
"""
