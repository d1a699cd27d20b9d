// DICOM C-STORE SCU: one association per call with DCMTK's blocking ASC_/
// DIMSE_ functions, plus a thread + uv_async_t wrapper. See scu.h.
extern "C" {
#include "core/error.h"
#include "core/log.h"
}

#include "dicom/dicom_int.h"
#include "dicom/scu.h"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dcdeftag.h>
#include <dcmtk/dcmdata/dcdict.h>
#include <dcmtk/dcmdata/dcfilefo.h>
#include <dcmtk/dcmdata/dcmetinf.h>
#include <dcmtk/dcmdata/dcuid.h>
#include <dcmtk/dcmdata/dcxfer.h>
#include <dcmtk/dcmnet/assoc.h>
#include <dcmtk/dcmnet/dcmtrans.h>
#include <dcmtk/dcmnet/dimse.h>
#include <dcmtk/dcmnet/dul.h>
#include <dcmtk/dcmtls/tlslayer.h>
#include <dcmtk/oflog/oflog.h>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>

#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

namespace {

const char *const kLogModule = "dicom";

std::once_flag g_scu_once;

void scu_global_setup() {
  OFLog::configure(OFLogger::ERROR_LOG_LEVEL);
  // DCMTK 3.6.7 has no per-association connect timeout.
  dcmConnectionTimeout.set(RR_DICOM_SCU_CONNECT_TIMEOUT_S);
}

// The association's socket, for TCP_NODELAY and for cancellation.
struct Watch {
  std::mutex mu;
  int fd = -1;
  bool cancelled = false;

  void attach(int s) {
    std::lock_guard<std::mutex> lk(mu);
    fd = s;
    if (cancelled)
      shutdown(fd, SHUT_RDWR);
  }
  void detach() {
    std::lock_guard<std::mutex> lk(mu);
    fd = -1;
  }
  void cancel() {
    std::lock_guard<std::mutex> lk(mu);
    cancelled = true;
    if (fd >= 0)
      shutdown(fd, SHUT_RDWR);
  }
  // Reads see end of file from now on while writes still work: an A-ABORT
  // goes out without DCMTK waiting for an unresponsive peer to close.
  void stop_reading() {
    std::lock_guard<std::mutex> lk(mu);
    if (fd >= 0)
      shutdown(fd, SHUT_RD);
  }
  bool is_cancelled() {
    std::lock_guard<std::mutex> lk(mu);
    return cancelled;
  }
};

// The requestor network's transport layer: sets TCP_NODELAY on the new
// socket before anything is sent, registers it for cancellation, and
// creates a TLS connection through the TLS layer when asked to.
class ScuLayer : public DcmTransportLayer {
public:
  ScuLayer(DcmTransportLayer *tls, Watch *w) : tls_(tls), w_(w) {}
  DcmTransportConnection *createConnection(DcmNativeSocketType sock, OFBool secure) override {
    int one = 1;
    setsockopt(sock, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    w_->attach(sock);
    if (secure)
      return tls_ ? tls_->createConnection(sock, secure) : nullptr;
    return new DcmTCPConnection(sock);
  }

private:
  DcmTransportLayer *tls_;
  Watch *w_;
};

bool valid_ae(const char *ae) {
  if (!ae)
    return false;
  size_t n = strlen(ae);
  if (n == 0 || n > 16)
    return false;
  for (size_t i = 0; i < n; i++)
    if (ae[i] == '\\' || static_cast<unsigned char>(ae[i]) < 0x20 ||
        static_cast<unsigned char>(ae[i]) > 0x7E)
      return false;
  return strspn(ae, " ") != n;
}

int check_config(const rr_dicom_scu_config_t *cfg) {
  if (!cfg || !valid_ae(cfg->calling_ae) || !valid_ae(cfg->called_ae) || !cfg->host ||
      !*cfg->host || strlen(cfg->host) > 200 || cfg->port < 1 || cfg->port > 65535)
    return RR_EINVAL;
  if (cfg->acse_timeout_s > 3600 || cfg->dimse_timeout_s > 3600)
    return RR_EINVAL;
  if (cfg->max_pdu && (cfg->max_pdu < 4096 || cfg->max_pdu > 131072))
    return RR_EINVAL;
  return 0;
}

bool uncompressed(const std::string &ts) {
  return ts == UID_LittleEndianExplicitTransferSyntax ||
         ts == UID_LittleEndianImplicitTransferSyntax || ts == UID_BigEndianExplicitTransferSyntax;
}

struct FileInfo {
  std::string sop_class, sop_instance, ts;
  T_ASC_PresentationContextID pcid = 0;
  const char *error = nullptr; // set: the file is not sent
};

std::string get(DcmItem *item, const DcmTagKey &tag) {
  OFString v;
  if (item && item->findAndGetOFString(tag, v).good())
    return v.c_str();
  return std::string();
}

FileInfo scan(const char *path, uint64_t max_bytes) {
  FileInfo fi;
  struct stat st;
  if (!path || stat(path, &st) != 0 || !S_ISREG(st.st_mode)) {
    fi.error = "cannot read the file";
    return fi;
  }
  if (static_cast<uint64_t>(st.st_size) > max_bytes) {
    fi.error = "file larger than max_file_bytes";
    return fi;
  }
  DcmFileFormat ff;
  OFCondition c = ff.loadFileUntilTag(OFFilename(path), EXS_Unknown, EGL_noChange, 4096,
                                      ERM_autoDetect, DCM_PixelData);
  if (c.bad()) {
    fi.error = "not a DICOM file";
    return fi;
  }
  fi.sop_class = get(ff.getDataset(), DCM_SOPClassUID);
  fi.sop_instance = get(ff.getDataset(), DCM_SOPInstanceUID);
  fi.ts = get(ff.getMetaInfo(), DCM_TransferSyntaxUID);
  if (fi.ts.empty())
    fi.ts = DcmXfer(ff.getDataset()->getOriginalXfer()).getXferID();
  if (fi.sop_class.empty() || fi.sop_instance.empty() || fi.ts.empty())
    fi.error = "no SOP class, SOP instance or transfer syntax UID";
  return fi;
}

const char *status_reason(Uint16 s) {
  if (s == STATUS_Success)
    return "stored";
  if (s == STATUS_STORE_Warning_CoercionOfDataElements)
    return "stored with warning: coercion of data elements";
  if (s == STATUS_STORE_Warning_DataSetDoesNotMatchSOPClass)
    return "stored with warning: data set does not match SOP class";
  if (s == STATUS_STORE_Warning_ElementsDiscarded)
    return "stored with warning: elements discarded";
  if ((s & 0xFF00) == 0xA700)
    return "refused: out of resources";
  if ((s & 0xFF00) == 0xA900)
    return "error: data set does not match SOP class";
  if ((s & 0xF000) == 0xC000)
    return "error: cannot understand";
  if (s == STATUS_STORE_Refused_SOPClassNotSupported)
    return "refused: SOP class not supported";
  if (s == STATUS_STORE_Refused_NotAuthorized)
    return "refused: not authorized";
  return "failure status";
}

void set_result(rr_dicom_scu_file_result_t *r, rr_dicom_scu_outcome_t o, int status,
                const char *reason) {
  r->outcome = o;
  r->status = status;
  r->reason = reason;
}

// Owns the DCMTK objects of one association.
struct Session {
  T_ASC_Network *net = nullptr;
  T_ASC_Parameters *params = nullptr;
  T_ASC_Association *assoc = nullptr;
  Watch *watch = nullptr;
  ~Session() {
    if (watch)
      watch->detach();
    if (assoc)
      ASC_destroyAssociation(&assoc); // also frees params
    else if (params)
      ASC_destroyAssociationParameters(&params);
    if (net)
      ASC_dropNetwork(&net);
  }
};

struct Store {
  const rr_dicom_scu_config_t *cfg;
  std::string name;
  const char *const *paths;
  size_t n;
  rr_dicom_scu_file_result_t *results;
  rr_dicom_scu_report_t *report;
  Watch *watch;
};

void finish_rest(Store &st, size_t from, const char *reason) {
  for (size_t i = from; i < st.n; i++)
    set_result(&st.results[i], RR_DICOM_SCU_FAILED, -1, reason);
}

// Sends one file on an established association. Returns false when the
// association is unusable afterwards (*why says how it ended).
bool send_one(Store &st, Session &s, size_t i, FileInfo &fi, int dimse_timeout, const char **why,
              int *rc) {
  rr_dicom_scu_file_result_t *r = &st.results[i];
  T_ASC_PresentationContext pc;
  if (fi.pcid == 0 || ASC_findAcceptedPresentationContext(s.params, fi.pcid, &pc).bad() ||
      pc.resultReason != ASC_P_ACCEPTANCE) {
    set_result(r, RR_DICOM_SCU_FAILED, -1, "no accepted presentation context");
    return true;
  }
  std::string accepted = pc.acceptedTransferSyntax;
  if (accepted != fi.ts && !(uncompressed(fi.ts) && uncompressed(accepted))) {
    set_result(r, RR_DICOM_SCU_FAILED, -1, "transfer syntax not accepted by the peer");
    return true;
  }
  DcmFileFormat ff;
  if (ff.loadFile(OFFilename(st.paths[i])).bad()) {
    set_result(r, RR_DICOM_SCU_FAILED, -1, "cannot read the file");
    return true;
  }
  T_DIMSE_C_StoreRQ req;
  memset(&req, 0, sizeof(req));
  req.MessageID = s.assoc->nextMsgID++;
  OFStandard::strlcpy(req.AffectedSOPClassUID, fi.sop_class.c_str(),
                      sizeof(req.AffectedSOPClassUID));
  OFStandard::strlcpy(req.AffectedSOPInstanceUID, fi.sop_instance.c_str(),
                      sizeof(req.AffectedSOPInstanceUID));
  req.DataSetType = DIMSE_DATASET_PRESENT;
  req.Priority = DIMSE_PRIORITY_MEDIUM;
  T_DIMSE_C_StoreRSP rsp;
  memset(&rsp, 0, sizeof(rsp));
  DcmDataset *detail = nullptr;
  OFCondition cond = DIMSE_storeUser(s.assoc, fi.pcid, &req, NULL, ff.getDataset(), NULL, NULL,
                                     DIMSE_NONBLOCKING, dimse_timeout, &rsp, &detail);
  delete detail;
  if (cond.bad()) {
    if (st.watch->is_cancelled()) {
      *why = "cancelled";
      *rc = RR_DICOM_ECANCELLED;
    } else if (cond == DIMSE_NODATAAVAILABLE) {
      *why = "no C-STORE-RSP within the DIMSE timeout";
      *rc = RR_DICOM_EABORTED;
    } else if (cond == DUL_PEERABORTEDASSOCIATION) {
      *why = "aborted by peer";
      *rc = RR_DICOM_EABORTED;
    } else if (cond == DUL_PEERREQUESTEDRELEASE) {
      *why = "released by peer during a transfer";
      *rc = RR_DICOM_EABORTED;
    } else {
      *why = "network error";
      *rc = RR_DICOM_EABORTED;
    }
    rr_log(RR_LOG_WARN, kLogModule,
           "event=scu_store_failed scu=%s file=%zu reason=\"%s\" err=\"%s\"", st.name.c_str(), i,
           *why, cond.text());
    set_result(r, RR_DICOM_SCU_FAILED, -1, *why);
    return false;
  }
  Uint16 status = rsp.DimseStatus;
  rr_dicom_scu_outcome_t o = RR_DICOM_SCU_FAILED;
  if (status == STATUS_Success)
    o = RR_DICOM_SCU_STORED;
  else if (status == STATUS_STORE_Warning_CoercionOfDataElements ||
           status == STATUS_STORE_Warning_DataSetDoesNotMatchSOPClass ||
           status == STATUS_STORE_Warning_ElementsDiscarded)
    o = RR_DICOM_SCU_WARNING;
  set_result(r, o, status, status_reason(status));
  if (o == RR_DICOM_SCU_FAILED)
    rr_log(RR_LOG_WARN, kLogModule,
           "event=scu_store_failed scu=%s file=%zu status=0x%04x reason=\"%s\"", st.name.c_str(), i,
           static_cast<unsigned>(status), r->reason);
  rr_log(RR_LOG_DEBUG, kLogModule, "event=scu_store scu=%s file=%zu status=0x%04x sop_instance=%s",
         st.name.c_str(), i, static_cast<unsigned>(status), fi.sop_instance.c_str());
  return true;
}

// Proposes the presentation contexts of the scanned files.
OFCondition propose(Session &s, std::vector<FileInfo> &files) {
  std::map<std::string, T_ASC_PresentationContextID> ids;
  unsigned next = 1;
  for (FileInfo &fi : files) {
    if (fi.error)
      continue;
    std::string key = fi.sop_class + "|" + fi.ts;
    auto it = ids.find(key);
    if (it != ids.end()) {
      fi.pcid = it->second;
      continue;
    }
    if (ids.size() >= RR_DICOM_SCU_MAX_CONTEXTS) {
      fi.error = "too many presentation contexts";
      continue;
    }
    std::vector<const char *> ts{fi.ts.c_str()};
    if (uncompressed(fi.ts)) {
      for (const char *t :
           {UID_LittleEndianExplicitTransferSyntax, UID_LittleEndianImplicitTransferSyntax})
        if (fi.ts != t)
          ts.push_back(t);
    }
    T_ASC_PresentationContextID id = static_cast<T_ASC_PresentationContextID>(next);
    OFCondition c = ASC_addPresentationContext(s.params, id, fi.sop_class.c_str(), ts.data(),
                                               static_cast<int>(ts.size()));
    if (c.bad())
      return c;
    ids[key] = id;
    fi.pcid = id;
    next += 2;
  }
  return EC_Normal;
}

int run(Store &st) {
  const rr_dicom_scu_config_t *cfg = st.cfg;
  rr_dicom_scu_report_t *rep = st.report;
  int acse = cfg->acse_timeout_s ? static_cast<int>(cfg->acse_timeout_s) : 30;
  int dimse = cfg->dimse_timeout_s ? static_cast<int>(cfg->dimse_timeout_s) : 60;
  long max_pdu = cfg->max_pdu ? static_cast<long>(cfg->max_pdu) : 65536;
  uint64_t max_bytes = cfg->max_file_bytes ? cfg->max_file_bytes : (uint64_t(2) << 30);
  finish_rest(st, 0, "not sent");
  rep->reason = "not sent";

  std::call_once(g_scu_once, scu_global_setup);
  if (!dcmDataDict.isDictionaryLoaded()) {
    rep->reason = "DICOM data dictionary not loaded";
    return RR_DICOM_EDCMTK;
  }
  std::vector<FileInfo> files;
  files.reserve(st.n);
  for (size_t i = 0; i < st.n; i++)
    files.push_back(scan(st.paths[i], max_bytes));

  std::unique_ptr<DcmTLSTransportLayer> tls;
  if (cfg->tls) {
    std::string why;
    tls = rr_dicom::make_tls_layer(NET_REQUESTOR, *cfg->tls, cfg->host, &why);
    if (!tls) {
      rr_log(RR_LOG_ERROR, kLogModule, "event=scu_failed scu=%s reason=\"TLS: %s\"",
             st.name.c_str(), why.c_str());
      rep->reason = "TLS set-up failed";
      finish_rest(st, 0, rep->reason);
      return RR_DICOM_ETLS;
    }
  }
  Session s;
  ScuLayer layer(tls.get(), st.watch);
  OFCondition c = ASC_initializeNetwork(NET_REQUESTOR, 0, acse, &s.net);
  if (c.good())
    c = ASC_setTransportLayer(s.net, &layer, 0);
  if (c.good())
    c = ASC_createAssociationParameters(&s.params, max_pdu);
  if (c.good())
    c = ASC_setAPTitles(s.params, cfg->calling_ae, cfg->called_ae, NULL);
  if (c.good())
    c = ASC_setTransportLayerType(s.params, tls ? OFTrue : OFFalse);
  std::string peer = std::string(cfg->host) + ":" + std::to_string(cfg->port);
  if (c.good())
    c = ASC_setPresentationAddresses(s.params, "localhost", peer.c_str());
  if (c.good())
    c = propose(s, files);
  if (c.bad()) {
    rr_log(RR_LOG_ERROR, kLogModule, "event=scu_failed scu=%s err=\"%s\"", st.name.c_str(),
           c.text());
    rep->reason = "DCMTK set-up failed";
    finish_rest(st, 0, rep->reason);
    return RR_DICOM_EDCMTK;
  }
  s.watch = st.watch;
  if (st.watch->is_cancelled()) {
    rep->reason = "cancelled";
    finish_rest(st, 0, rep->reason);
    return RR_DICOM_ECANCELLED;
  }

  c = ASC_requestAssociation(s.net, s.params, &s.assoc);
  if (c.bad()) {
    int rc = RR_DICOM_ECONNECT;
    if (st.watch->is_cancelled()) {
      rep->reason = "cancelled";
      rc = RR_DICOM_ECANCELLED;
    } else if (c == DUL_ASSOCIATIONREJECTED) {
      T_ASC_RejectParameters rj;
      ASC_getRejectParameters(s.params, &rj);
      rep->reject_result = static_cast<int>(rj.result);
      rep->reject_source = static_cast<int>(rj.source);
      rep->reject_reason = static_cast<int>(rj.reason) & 0xFF;
      rep->reason = "association rejected";
      rc = RR_DICOM_EREJECTED;
    } else if (c.code() == DULC_TLSERROR || c.module() == OFM_dcmtls) {
      rep->reason = "TLS handshake failed";
    } else if (c == DUL_READTIMEOUT) {
      rep->reason = "no answer to the A-ASSOCIATE-RQ within the ACSE timeout";
    } else if (c.code() == DULC_TCPINITERROR) {
      rep->reason = "cannot connect";
    } else {
      rep->reason = "connection closed before an A-ASSOCIATE-AC";
    }
    rr_log(RR_LOG_WARN, kLogModule,
           "event=scu_assoc_failed scu=%s peer=%s called=%s reason=\"%s\" result=%d source=%d "
           "diag=%d err=\"%s\"",
           st.name.c_str(), peer.c_str(), cfg->called_ae, rep->reason, rep->reject_result,
           rep->reject_source, rep->reject_reason, c.text());
    finish_rest(st, 0, rep->reason);
    return rc;
  }
  rr_log(RR_LOG_INFO, kLogModule,
         "event=scu_associated scu=%s peer=%s calling=%s called=%s tls=%d files=%zu contexts=%d",
         st.name.c_str(), peer.c_str(), cfg->calling_ae, cfg->called_ae, tls ? 1 : 0, st.n,
         ASC_countAcceptedPresentationContexts(s.params));

  int rc = 0;
  const char *why = "released";
  for (size_t i = 0; i < st.n; i++) {
    if (files[i].error) {
      set_result(&st.results[i], RR_DICOM_SCU_FAILED, -1, files[i].error);
      continue;
    }
    if (st.watch->is_cancelled()) {
      why = "cancelled";
      rc = RR_DICOM_ECANCELLED;
      finish_rest(st, i, why);
      break;
    }
    if (!send_one(st, s, i, files[i], dimse, &why, &rc)) {
      st.watch->stop_reading();
      ASC_abortAssociation(s.assoc);
      finish_rest(st, i + 1, why);
      break;
    }
  }
  if (rc == 0) {
    c = ASC_releaseAssociation(s.assoc);
    if (c.bad()) {
      why = "release failed";
      st.watch->stop_reading();
      ASC_abortAssociation(s.assoc);
    }
  } else if (rc == RR_DICOM_ECANCELLED) {
    ASC_abortAssociation(s.assoc);
  }
  rep->reason = why;
  return rc;
}

void tally(rr_dicom_scu_report_t *rep, const rr_dicom_scu_file_result_t *results, size_t n) {
  rep->stored = rep->warnings = rep->failed = 0;
  for (size_t i = 0; i < n; i++) {
    if (results[i].outcome == RR_DICOM_SCU_FAILED)
      rep->failed++;
    else
      rep->stored++;
    if (results[i].outcome == RR_DICOM_SCU_WARNING)
      rep->warnings++;
  }
}

int store(const rr_dicom_scu_config_t *cfg, const char *const *paths, size_t n,
          rr_dicom_scu_file_result_t *results, rr_dicom_scu_report_t *report, Watch *watch) {
  rr_dicom_scu_report_t local;
  rr_dicom_scu_report_t *rep = report ? report : &local;
  memset(rep, 0, sizeof(*rep));
  rep->reason = "invalid arguments";
  rep->files = results;
  rep->n_files = results ? n : 0;
  int rc = check_config(cfg);
  if (rc == 0 && (!paths || n == 0 || !results))
    rc = RR_EINVAL;
  if (rc != 0) {
    rep->rc = rc;
    if (results)
      for (size_t i = 0; i < n; i++)
        set_result(&results[i], RR_DICOM_SCU_FAILED, -1, rep->reason);
    tally(rep, results, rep->n_files);
    return rc;
  }
  Store st{cfg, cfg->name && *cfg->name ? cfg->name : "dicom-scu", paths, n, results, rep, watch};
  try {
    rc = run(st);
  } catch (const std::bad_alloc &) {
    rc = RR_ENOMEM;
    rep->reason = "out of memory";
  } catch (...) {
    rc = RR_DICOM_EINTERNAL;
    rep->reason = "internal error";
  }
  if (rc == RR_ENOMEM || rc == RR_DICOM_EINTERNAL)
    for (size_t i = 0; i < n; i++)
      if (results[i].outcome == RR_DICOM_SCU_FAILED)
        results[i].reason = rep->reason;
  rep->rc = rc;
  tally(rep, results, n);
  rr_log(RR_LOG_INFO, kLogModule,
         "event=scu_done scu=%s called=%s rc=%d reason=\"%s\" stored=%u warnings=%u failed=%u",
         st.name.c_str(), cfg->called_ae, rc, rep->reason, rep->stored, rep->warnings, rep->failed);
  return rc;
}

} // namespace

// ---- async wrapper ------------------------------------------------------------

struct rr_dicom_scu_req {
  uv_async_t async;
  rr_dicom_scu_cb cb = nullptr;
  void *ud = nullptr;
  // Copies of the caller's configuration and paths.
  std::string name, calling, called, host, cert, key, ca;
  rr_dicom_tls_config_t tls{};
  rr_dicom_scu_config_t cfg{};
  std::vector<std::string> path_store;
  std::vector<const char *> paths;
  std::vector<rr_dicom_scu_file_result_t> results;
  rr_dicom_scu_report_t report{};
  Watch watch;
  std::thread th;
};

namespace {

const char *dup_or_null(std::string &dst, const char *src) {
  if (!src)
    return nullptr;
  dst = src;
  return dst.c_str();
}

void on_send_closed(uv_handle_t *h) {
  delete static_cast<rr_dicom_scu_req *>(h->data);
}

void on_send_done(uv_async_t *h) {
  rr_dicom_scu_req *r = static_cast<rr_dicom_scu_req *>(h->data);
  r->th.join();
  r->cb(r->ud, &r->report);
  uv_close(reinterpret_cast<uv_handle_t *>(&r->async), on_send_closed);
}

void send_main(rr_dicom_scu_req *r) {
  store(&r->cfg, r->paths.data(), r->paths.size(), r->results.data(), &r->report, &r->watch);
  uv_async_send(&r->async);
}

int start_send(uv_loop_t *loop, const rr_dicom_scu_config_t *cfg, const char *const *paths,
               size_t n, rr_dicom_scu_cb cb, void *ud, rr_dicom_scu_send_t **req) {
  if (req)
    *req = nullptr;
  if (!loop || !cb || !paths || n == 0 || check_config(cfg) != 0)
    return RR_EINVAL;
  std::unique_ptr<rr_dicom_scu_req> r(new rr_dicom_scu_req());
  r->cb = cb;
  r->ud = ud;
  r->cfg = *cfg;
  r->cfg.name = dup_or_null(r->name, cfg->name);
  r->cfg.calling_ae = dup_or_null(r->calling, cfg->calling_ae);
  r->cfg.called_ae = dup_or_null(r->called, cfg->called_ae);
  r->cfg.host = dup_or_null(r->host, cfg->host);
  if (cfg->tls) {
    r->tls = *cfg->tls;
    r->tls.cert_file = dup_or_null(r->cert, cfg->tls->cert_file);
    r->tls.key_file = dup_or_null(r->key, cfg->tls->key_file);
    r->tls.ca_file = dup_or_null(r->ca, cfg->tls->ca_file);
    r->cfg.tls = &r->tls;
  }
  r->path_store.reserve(n);
  for (size_t i = 0; i < n; i++)
    r->path_store.push_back(paths[i] ? paths[i] : "");
  for (const std::string &p : r->path_store)
    r->paths.push_back(p.c_str());
  r->results.resize(n);
  int rc = uv_async_init(loop, &r->async, on_send_done);
  if (rc != 0)
    return rc;
  r->async.data = r.get();
  try {
    r->th = std::thread(send_main, r.get());
  } catch (...) {
    // The async handle is initialised: it is closed through the loop.
    rr_dicom_scu_req *raw = r.release();
    uv_close(reinterpret_cast<uv_handle_t *>(&raw->async), on_send_closed);
    return RR_DICOM_EINTERNAL;
  }
  if (req)
    *req = r.get();
  r.release();
  return 0;
}

} // namespace

extern "C" int rr_dicom_scu_store(const rr_dicom_scu_config_t *cfg, const char *const *paths,
                                  size_t n, rr_dicom_scu_file_result_t *results,
                                  rr_dicom_scu_report_t *report) {
  try {
    Watch w;
    return store(cfg, paths, n, results, report, &w);
  } catch (const std::bad_alloc &) {
    return RR_ENOMEM;
  } catch (...) {
    return RR_DICOM_EINTERNAL;
  }
}

extern "C" int rr_dicom_scu_send(uv_loop_t *loop, const rr_dicom_scu_config_t *cfg,
                                 const char *const *paths, size_t n, rr_dicom_scu_cb cb, void *ud,
                                 rr_dicom_scu_send_t **req) {
  try {
    return start_send(loop, cfg, paths, n, cb, ud, req);
  } catch (const std::bad_alloc &) {
    return RR_ENOMEM;
  } catch (...) {
    return RR_DICOM_EINTERNAL;
  }
}

extern "C" void rr_dicom_scu_cancel(rr_dicom_scu_send_t *req) {
  if (!req)
    return;
  try {
    req->watch.cancel();
  } catch (...) {
  }
}

extern "C" const char *rr_dicom_scu_strerror(int code) {
  switch (code) {
  case RR_DICOM_ECONNECT: return "cannot connect to the DICOM peer";
  case RR_DICOM_EREJECTED: return "association rejected by the DICOM peer";
  case RR_DICOM_EABORTED: return "association aborted or lost";
  case RR_DICOM_ECANCELLED: return "DICOM transfer cancelled";
  default: return rr_dicom_scp_strerror(code);
  }
}
