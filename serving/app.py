"""The Serve face that deploy configs name: `import_path: serving.app:build_app` (serving/config.yaml, the RayService).

The application itself (the `ChatAPI` ingress over `VLMEngine` replicas) is `vitune.serve.app`, in the installed
package, so replicas import it wherever they run; this module only gives it the name the configs use.
"""

from vitune.serve.app import ChatAPI, VLMEngine, build_app, make_app

__all__ = ["ChatAPI", "VLMEngine", "build_app", "make_app"]
