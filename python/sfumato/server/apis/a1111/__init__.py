"""The AUTOMATIC1111 web UI API, ``/sdapi/v1``, for the clients that speak it.

``txt2img`` and ``img2img`` answer when the images are ready, as A1111 does;
underneath they are jobs of the same durable queue as every other route, so
the queue limit, FIFO order and ``interrupt`` apply to them too. The package holds
the bodies (:mod:`.schemas`), the infotext (:mod:`.infotext`), the settings store
(:mod:`.options`), the extras upscaling (:mod:`.upscale`) and the routes (:mod:`.routes`).
"""

from sfumato.server.apis.a1111.routes import router

__all__ = ["router"]
