"""split-plain / split-he / split-he-full with the server (head) and the hospitals (encoders, data, labels, keys) in separate processes.

Architecture
------------
* :class:`SplitServicer` serves ``splitfl.v1.SplitService`` around a real
  :class:`~splitfl.split.server.SplitServer` (head, optimizer, scheduler, and in
  split-he only the consortium's PUBLIC context, uploaded by a hospital). Every
  call is checked in the protocol's order (token + client certificate by
  :class:`~splitfl.net.tls.SiteAuthInterceptor`, then version, run id + config
  fingerprint, site, session, sequence) before any payload is read; payloads
  are chunk streams (:mod:`splitfl.net.chunks`).
* :class:`Coordinator` hands out training steps in exactly the in-process
  order (:meth:`SplitRunner.train_epoch`: round-robin over hospitals, skipping
  those without batches left) through ``GetTurn``. A hospital silent past
  ``turn_timeout_s`` is skipped for the rest of the epoch; training goes on.
* Shared-encoder relay (sequential split learning): after its step the
  hospital uploads the hospitals' shared state (encoder, its optimizer and
  scheduler, DP accountants and noise generator) sealed with AES-256-GCM under
  a key derived with HKDF-SHA256 from the consortium secret (split-he:
  ``keys/consortium.secret``; split-plain: ``keys/relay.secret``), which the
  server never holds. The server stores the opaque blob and hands it to the
  next hospital (``UploadRelay`` / ``DownloadRelay``); the relay version is in
  the blob's associated data. With a frozen encoder and no DP noise nothing is
  relayed (the hospitals' shared state never changes).
* :class:`RemoteSplitServer` is the hospital's stub with the methods the
  transports call: a :class:`SplitRunner` built with
  ``server_factory=client.bind`` runs the very same hospital code as in
  process.
* The server runs :func:`splitfl.engine.fit` with :class:`RemoteServerRunner`:
  epochs and evaluations happen at the hospitals, checkpoints hold the head,
  its optimizer and the sealed relay blob, so the usual atomic checkpoints and
  resume work (hospitals are stateless between steps).
* DP (split-he with ``split.dp_noise_multiplier > 0``): the accountants
  travel in the sealed relay, so each hospital reports its own spent epsilon
  with ``EndEpoch`` (``EndEpochRequest.epsilon``); the server's history and
  ``metrics.json`` carry the same ``epsilon`` / ``privacy`` as in process.

* split-he-full (:mod:`splitfl.he.encrypted_head`): the server's head is
  ``enc(W)``, a :class:`~splitfl.split.full_server.FullSplitServer` built once
  it holds the consortium's PUBLIC context (``UploadContext``: relinearisation
  and batch-sum Galois keys, ``full_public_context_bytes``) and the initial
  ``enc(W)``, which the first hospital whose ``Hello`` says ``weights_needed``
  encrypts and uploads (``UploadWeights`` INITIAL); before that every training
  or evaluation call is refused. ``Forward`` / ``Backward`` carry exactly the
  in-process ``FullHETransport`` messages (``SFCT`` ciphertext lists:
  ``enc(x)``, ``enc(partial logits)``, ``enc(lr G)``, ``enc(dL/dx)``); when the
  head's update budget is spent ``Backward`` says ``refresh_needed`` and the
  step stays open until its holder downloads ``enc(W)``, decrypts,
  re-encrypts and uploads it (``DownloadWeights`` / ``UploadWeights``
  REFRESH; the server counts it). When the validation score improves the
  server asks one hospital to release the head (``TURN_STATE_RELEASE``): it
  downloads ``enc(W)``, decrypts it and writes the released plaintext model,
  ``<hospital out>/best_model.pt`` (encoder + head, as ``splitfl train``
  writes it). Only hospitals write plaintext weights; what the server writes
  instead is listed in :mod:`~splitfl.net.split.server`.

Modules
-------
The package is split by role, imports going one way.
:mod:`~splitfl.net.split.client` is the hospital's side of the wire without
torch (:class:`~splitfl.net.split.client.SplitClient`: every RPC a hospital
makes, the wire's constants, :class:`RemoteError`); the clinic load benchmark
runs hundreds of them. :mod:`~splitfl.net.split.common` holds what both sides
share (the client's wire names re-exported, the config fingerprint, the
server's errors, relay sealing, the consortium keys). The server's side is
:mod:`~splitfl.net.split.coordinator` (sessions, turns, the epoch barrier,
evaluations), :mod:`~splitfl.net.split.servicer` (the gRPC service and
:func:`serve`) and :mod:`~splitfl.net.split.server` (:func:`run_split_server`,
the epoch loop), each importing only those before it. The hospital,
:mod:`~splitfl.net.split.hospital` (:class:`RemoteSplitServer`, a
:class:`SplitClient` with the SplitServer interface, and
:func:`run_split_site`), imports only the client and
:mod:`~splitfl.net.split.common`: it never sees the server's code, and the
server's modules never import it.

This package re-exports nothing: importing it must not load torch, so that
``splitfl.net.split.client`` stays light. Import from the modules.

Entry points: :func:`splitfl.net.split.server.run_split_server` and
:func:`splitfl.net.split.hospital.run_split_site`.
"""
