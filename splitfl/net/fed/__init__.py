"""FedAvg / FedProx over gRPC: the ``FederationService`` server and the hospital (site) client.

Architecture
------------
* :class:`FederationServer` is the servicer. It wraps a
  :class:`splitfl.fed.server.FedServerCore` (the same validation,
  aggregation and books as the in-process :class:`splitfl.fed.runner.FedRunner`)
  and a small round state machine guarded by one condition variable.
* :class:`RemoteFedRunner` is the coordinator: a runner for
  :func:`splitfl.engine.fit` whose ``train_epoch`` opens one round on the
  server and blocks until it is aggregated, so checkpoints, resume,
  ``metrics.json`` and ``history.csv`` are exactly those of the in-process run.
* :class:`FedSiteClient` is a hospital: it joins, long-polls ``GetRound``,
  downloads the global model when sampled, trains locally with
  :class:`splitfl.fed.site.Site`, packages the update with
  :func:`splitfl.fed.site.package_update` and submits it.

Round protocol (see protos/README.md "one federated round")::

    Join -> GetRound(min_round r) -> [sampled] DownloadModel(r, GLOBAL_MODEL)
         -> local training -> SubmitUpdate(r, parts) -> GetRound(min_round r+1) ...

``fed.secure: he``: the server holds only the consortium's PUBLIC context (a
file next to its certificate, made by ``splitfl simulate`` or ``splitfl
keys``); the secret context is a file shared by the sites. After the round's
encrypted sum is complete, the server asks one key-holding site that took part
(``RoundInfo.decrypt_aggregate``) to download the ENCRYPTED_AGGREGATE, decrypt
it and submit the weighted mean of the encrypted coordinates as a
DECRYPTED_MEAN part. The server thus holds the round's aggregate (never an
individual update), exactly as in the in-process path, and makes it the next
global model; it can evaluate the model, select the best round and checkpoint.

``fed.secure: masks``: after local training each sampled site runs the
four-step exchange of Bonawitz et al. (:mod:`splitfl.fed.secagg`) over
``SecAggSubmit`` / ``SecAggFetch`` (AdvertiseKeys, KeyBroadcast, ShareKeys,
ShareDelivery, MaskedInput, UnmaskRequest, UnmaskResponse); the server runs
:class:`~splitfl.fed.secagg.SecAggServer` and learns only the count-weighted
sum. A site that misses a step's deadline is a dropout of that step.

Failures
--------
* A sampled site that has not submitted when the round's deadline passes
  (``round_timeout``) is dropped from the round (logged); the round goes on
  with what arrived (``fed.min_sites`` accepted updates or the model stays).
  The site may come back (rejoin) in a later round.
* A restarted server resumes from its checkpoint (``fit``); sites whose
  server has gone retry with exponential backoff for up to
  ``connect_timeout`` seconds and rejoin.
* Under ``fed.secure: masks`` a site that dies after sharing its keys but
  before sending its masked input misses the MaskedInput deadline
  (``phase_timeout``, default ``round_timeout``: the steps after AdvertiseKeys
  involve no training, so their deadline can be much shorter than that of
  AdvertiseKeys, which waits for the local training); the server lists it as
  dropped in the UnmaskRequest and the survivors' Shamir shares of its mask
  key remove its pairwise masks, so the round's sum is that of the survivors
  (Bonawitz et al.'s dropout recovery). Test hook: a site whose environment has
  ``SPLITFL_TEST_SECAGG_DIE_AFTER=<step>`` (``advertise_keys``,
  ``share_keys``, ``masked_input``) SIGKILLs itself right after sending that
  message (tests/test_net_federation.py); never set it in a deployment.
* Every malformed, tampered, replayed or unauthenticated request ends with a
  gRPC status and a ``splitfl.v1.ErrorDetail`` in the trailing metadata
  (``splitfl-error-bin``); the server's state is unchanged and it keeps
  serving the others.

Modules
-------
The package is split by role, imports going one way.
:mod:`~splitfl.net.fed.client` is a site's side of the wire without torch
(:class:`~splitfl.net.fed.client.FedClient`: Join, GetRound, DownloadModel,
SubmitUpdate; :class:`RemoteError`); the clinic load benchmark runs a hundred
of them. :mod:`~splitfl.net.fed.common` holds what both sides share (the
client's wire names re-exported, site names, the run id and configuration
fingerprint, the consortium context's fingerprint, the server's errors). The
server's side is :mod:`~splitfl.net.fed.servicer` (:class:`FederationServer`,
its round state machine, and :func:`make_server`) and
:mod:`~splitfl.net.fed.server` (:class:`RemoteFedRunner`, the round loop),
each importing only those before it. The hospital,
:mod:`~splitfl.net.fed.hospital` (:class:`FedSiteClient`, a
:class:`FedClient` that trains), imports only the client and
:mod:`~splitfl.net.fed.common`: it never sees the server's code, and the
server's modules never import it.

This package re-exports nothing: importing it must not load torch, so that
``splitfl.net.fed.client`` stays light. Import from the modules.

Entry points: ``splitfl serve`` and ``splitfl join``
(:func:`splitfl.net.launch.serve`, :func:`splitfl.net.launch.join`).
"""
