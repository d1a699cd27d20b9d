// DICOM C-ECHO / C-STORE SCP: an acceptor thread, one worker thread per
// connection running DCMTK's blocking ASC_/DIMSE_ calls, and a queue drained
// on the loop thread through a uv_async_t. See scp.h for the contract.
extern "C" {
#include "core/error.h"
#include "core/log.h"
}

#include "dicom/dicom_int.h"
#include "dicom/scp.h"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dcdeftag.h>
#include <dcmtk/dcmdata/dcdict.h>
#include <dcmtk/dcmdata/dcfilefo.h>
#include <dcmtk/dcmdata/dcmetinf.h>
#include <dcmtk/dcmdata/dcuid.h>
#include <dcmtk/dcmnet/assoc.h>
#include <dcmtk/dcmnet/dcmtrans.h>
#include <dcmtk/dcmnet/dimse.h>
#include <dcmtk/dcmnet/dul.h>
#include <dcmtk/dcmnet/dulstruc.h>
#include <dcmtk/dcmtls/tlslayer.h>
#include <dcmtk/oflog/oflog.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

namespace {

const char *const kLogModule = "dicom";

// DCMTK's only way to hand it an accepted socket is the process-wide
// dcmExternalSocketHandle; reading an A-ASSOCIATE-RQ also runs the shared
// network key's state machine. Both are guarded by this lock, for every SCP
// in the process.
std::mutex g_receive_mutex;
std::once_flag g_dcmtk_once;

void dcmtk_global_setup() {
  // No reverse DNS inside the receive lock; peers are logged as addresses.
  dcmDisableGethostbyaddr.set(OFTrue);
  // DCMTK's own logger writes to stderr outside the engine's log format.
  OFLog::configure(OFLogger::ERROR_LOG_LEVEL);
}

const char *const kTransferSyntaxes[] = {
    UID_LittleEndianExplicitTransferSyntax,
    UID_LittleEndianImplicitTransferSyntax,
    UID_BigEndianExplicitTransferSyntax,
    UID_DeflatedExplicitVRLittleEndianTransferSyntax,
    UID_JPEGProcess1TransferSyntax,
    UID_JPEGProcess2_4TransferSyntax,
    UID_JPEGProcess14TransferSyntax,
    UID_JPEGProcess14SV1TransferSyntax,
    UID_JPEGLSLosslessTransferSyntax,
    UID_JPEGLSLossyTransferSyntax,
    UID_JPEG2000LosslessOnlyTransferSyntax,
    UID_JPEG2000TransferSyntax,
    UID_RLELosslessTransferSyntax,
    UID_MPEG2MainProfileAtMainLevelTransferSyntax,
    UID_MPEG2MainProfileAtHighLevelTransferSyntax,
    UID_MPEG4HighProfileLevel4_1TransferSyntax,
    UID_MPEG4BDcompatibleHighProfileLevel4_1TransferSyntax,
    UID_MPEG4HighProfileLevel4_2_For2DVideoTransferSyntax,
    UID_MPEG4HighProfileLevel4_2_For3DVideoTransferSyntax,
    UID_MPEG4StereoHighProfileLevel4_2TransferSyntax,
    UID_HEVCMainProfileLevel5_1TransferSyntax,
    UID_HEVCMain10ProfileLevel5_1TransferSyntax,
};
const char *const kEchoTransferSyntaxes[] = {
    UID_LittleEndianExplicitTransferSyntax,
    UID_LittleEndianImplicitTransferSyntax,
    UID_BigEndianExplicitTransferSyntax,
};

// Instance fields, in the order of rr_dicom_instance_t's strings.
enum Field {
  F_PATH,
  F_CALLING,
  F_CALLED,
  F_PEER,
  F_TS,
  F_SOP_CLASS,
  F_SOP_INSTANCE,
  F_STUDY,
  F_SERIES,
  F_PATIENT_ID,
  F_ACCESSION,
  F_MODALITY,
  F_BODY_PART,
  F_STUDY_DESC,
  F_STUDY_DATE,
  F_STUDY_TIME,
  F_SERIES_NUMBER,
  F_INSTANCE_NUMBER,
  F_COUNT
};

struct Event {
  enum Type { INSTANCE, ASSOC, STOPPED } type = STOPPED;
  std::string s[F_COUNT]; // INSTANCE: fields; ASSOC: F_PEER, F_CALLING, F_CALLED
  uint64_t assoc_id = 0;
  uint64_t size = 0; // INSTANCE: file size; ASSOC: bytes
  rr_dicom_assoc_kind_t kind = RR_DICOM_ASSOC_ACCEPTED;
  int rj_result = 0, rj_source = 0, rj_reason = 0;
  const char *reason = "";
  unsigned instances = 0, contexts = 0;
  uint64_t token = 0; // INSTANCE with confirm: the worker waits for it
};

struct PeerRule {
  bool any = false;
  int family = 0; // AF_INET or AF_INET6
  unsigned char addr[16] = {};
  unsigned prefix = 0;
};

enum Verdict { V_OK, V_LIMIT, V_ADDRESS };

struct Conn {
  uint64_t id = 0;
  int fd = -1; // ours; DCMTK gets a dup. Closed under the SCP mutex.
  std::string peer;
  Verdict verdict = V_OK;
  bool holds_slot = false;
  bool done = false;
  std::thread th;
  std::string calling, called;
  unsigned instances = 0;
  uint64_t bytes = 0;
  uint64_t part_seq = 0;
};

struct StoreCtx;

std::string trim(const char *p) {
  std::string s(p ? p : "");
  size_t b = s.find_first_not_of(' ');
  if (b == std::string::npos)
    return std::string();
  size_t e = s.find_last_not_of(' ');
  return s.substr(b, e - b + 1);
}

bool valid_uid(const char *u) {
  size_t n = strlen(u);
  if (n == 0 || n > 64 || u[0] == '.')
    return false;
  for (size_t i = 0; i < n; i++) {
    if (!((u[i] >= '0' && u[i] <= '9') || u[i] == '.'))
      return false;
  }
  return true;
}

int parse_peer_rule(const std::string &text, PeerRule *r) {
  if (text == "*") {
    r->any = true;
    return 0;
  }
  std::string addr = text;
  long prefix = -1;
  size_t slash = text.find('/');
  if (slash != std::string::npos) {
    addr = text.substr(0, slash);
    std::string p = text.substr(slash + 1);
    if (p.empty() || p.size() > 3 || p.find_first_not_of("0123456789") != std::string::npos)
      return RR_EINVAL;
    prefix = std::stol(p);
  }
  if (inet_pton(AF_INET, addr.c_str(), r->addr) == 1) {
    r->family = AF_INET;
    if (prefix > 32)
      return RR_EINVAL;
    r->prefix = prefix < 0 ? 32u : static_cast<unsigned>(prefix);
  } else if (inet_pton(AF_INET6, addr.c_str(), r->addr) == 1) {
    r->family = AF_INET6;
    if (prefix > 128)
      return RR_EINVAL;
    r->prefix = prefix < 0 ? 128u : static_cast<unsigned>(prefix);
  } else {
    return RR_EINVAL;
  }
  return 0;
}

bool rule_matches(const PeerRule &r, int family, const unsigned char *addr) {
  if (r.any)
    return true;
  if (r.family != family)
    return false;
  unsigned full = r.prefix / 8, rest = r.prefix % 8;
  if (memcmp(r.addr, addr, full) != 0)
    return false;
  if (rest == 0)
    return true;
  unsigned char mask = static_cast<unsigned char>(0xFFu << (8 - rest));
  return (r.addr[full] & mask) == (addr[full] & mask);
}

// ---- TLS -------------------------------------------------------------------

// TLS 1.2 suites of the BCP 195 profiles with ECDSA added (the test PKI and
// many sites use P-256 keys); TLS 1.3 suites are all AEAD.
const char *const kTls12Ciphers = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
                                  "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
                                  "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
                                  "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384";
const char *const kTls13Suites =
    "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256";

std::once_flag g_openssl_once;

// The connection of a handshake done before ASC_receiveAssociation, handed
// to DCMTK by HandoffLayer on the same thread.
thread_local DcmTransportConnection *t_handoff = nullptr;

// The SCP network's transport layer when TLS is on: DCMTK's own handshake
// would run inside g_receive_mutex, so the worker does it first and this
// layer returns that connection (DCMTK's second SSL_accept on a finished
// handshake is a no-op).
class HandoffLayer : public DcmTransportLayer {
public:
  DcmTransportConnection *createConnection(DcmNativeSocketType sock, OFBool secure) override {
    if (!secure)
      return new DcmTCPConnection(sock);
    DcmTransportConnection *c = t_handoff;
    t_handoff = nullptr;
    return c;
  }
};

} // namespace

std::unique_ptr<DcmTLSTransportLayer> rr_dicom::make_tls_layer(T_ASC_NetworkRole role,
                                                               const rr_dicom_tls_config_t &cfg,
                                                               const std::string &peer_host,
                                                               std::string *why) {
  std::call_once(g_openssl_once, [] { DcmTLSTransportLayer::initializeOpenSSL(); });
  bool requestor = role == NET_REQUESTOR;
  bool has_cert = cfg.cert_file && *cfg.cert_file;
  bool has_ca = cfg.ca_file && *cfg.ca_file;
  if (has_cert != (cfg.key_file && *cfg.key_file)) {
    *why = "cert_file and key_file go together";
    return nullptr;
  }
  if (!requestor && !has_cert) {
    *why = "a TLS server needs cert_file and key_file";
    return nullptr;
  }
  if ((requestor || cfg.require_peer_cert) && !has_ca) {
    *why = "ca_file is required to verify the peer";
    return nullptr;
  }
  std::unique_ptr<DcmTLSTransportLayer> t(new DcmTLSTransportLayer(role, NULL, OFFalse));
  if (!*t) {
    *why = "cannot create a TLS context";
    return nullptr;
  }
  OFCondition c = t->setTLSProfile(TSP_Profile_BCP195_ND);
  if (c.good())
    c = t->activateCipherSuites();
  if (c.bad()) {
    *why = std::string("TLS profile: ") + c.text();
    return nullptr;
  }
  SSL_CTX *ctx = t->getNativeHandle();
  if (SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
      SSL_CTX_set_cipher_list(ctx, kTls12Ciphers) != 1 ||
      SSL_CTX_set_ciphersuites(ctx, kTls13Suites) != 1) {
    *why = "cannot set the TLS protocol and cipher policy";
    return nullptr;
  }
  // Through OpenSSL directly: DCMTK 3.6.7's setCertificateFile leaks the
  // public key it inspects.
  if (has_cert) {
    if (SSL_CTX_use_certificate_chain_file(ctx, cfg.cert_file) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, cfg.key_file, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
      ERR_clear_error();
      *why = "cannot load cert_file/key_file, or they do not match";
      return nullptr;
    }
  }
  if (has_ca && t->addTrustedCertificateFile(cfg.ca_file, DCF_Filetype_PEM).bad()) {
    *why = "cannot load ca_file";
    return nullptr;
  }
  if (requestor) {
    t->setCertificateVerification(DCV_requireCertificate);
    X509_VERIFY_PARAM *param = SSL_CTX_get0_param(ctx);
    unsigned char addr[16];
    bool ip = inet_pton(AF_INET, peer_host.c_str(), addr) == 1 ||
              inet_pton(AF_INET6, peer_host.c_str(), addr) == 1;
    int ok = ip ? X509_VERIFY_PARAM_set1_ip_asc(param, peer_host.c_str())
                : X509_VERIFY_PARAM_set1_host(param, peer_host.c_str(), 0);
    if (ok != 1) {
      *why = "cannot set the expected server name";
      return nullptr;
    }
  } else {
    t->setCertificateVerification(cfg.require_peer_cert ? DCV_requireCertificate
                                  : has_ca              ? DCV_checkCertificate
                                                        : DCV_ignoreCertificate);
  }
  return t;
}

struct rr_dicom_scp {
  uv_loop_t *loop = nullptr;
  uv_async_t async;
  rr_dicom_scp_callbacks_t cb = {};
  void *ud = nullptr;

  // Configuration (immutable after start).
  std::string name, host, ae_title, spool;
  std::vector<std::string> calling_aes;
  bool any_calling_ae = false;
  std::vector<PeerRule> peers;
  std::vector<std::string> sop_class_store;
  std::vector<const char *> sop_classes;
  unsigned max_assoc = 8;
  uint64_t min_free = 0;
  int acse_timeout = 30, dimse_timeout = 60, idle_timeout = 120;
  long max_pdu = 65536;
  size_t max_events = 10000;

  std::unique_ptr<DcmTLSTransportLayer> tls; // NULL: plain TCP
  HandoffLayer handoff;

  int listen_fd = -1;
  int wake_fd = -1;
  int spool_fd = -1;
  int port = 0;
  T_ASC_Network *net = nullptr;
  std::thread acceptor;

  // Guarded by mu.
  mutable std::mutex mu;
  std::condition_variable workers_cv;
  std::list<std::unique_ptr<Conn>> conns;
  unsigned active = 0;    // slot holders
  unsigned rejecting = 0; // threads serving a refusal
  unsigned live = 0;      // worker threads not finished
  std::deque<Event> events;
  size_t reserved = 0; // instance events promised to finishing C-STOREs
  bool confirm = false;
  uint64_t next_token = 0;
  std::map<uint64_t, int> confirmed; // token -> status (-1 while waiting)
  std::condition_variable confirm_cv;
  rr_dicom_scp_stats_t stats = {};
  uint64_t next_id = 0;

  std::atomic<bool> stopping{false};
  bool stop_called = false; // loop thread only
  uint64_t deadline_ms = 0;
  rr_dicom_scp_stopped_cb stopped_cb = nullptr;
  void *stopped_ud = nullptr;
};

namespace {

// ---- events (worker threads -> loop) ---------------------------------------

void push_event(rr_dicom_scp *scp, Event &&ev, bool reserved) {
  bool send = true;
  {
    std::lock_guard<std::mutex> lk(scp->mu);
    if (reserved) {
      scp->reserved--;
    } else if (ev.type == Event::ASSOC && scp->events.size() + scp->reserved >= scp->max_events) {
      scp->stats.dropped_events++;
      send = false;
    }
    if (send)
      scp->events.push_back(std::move(ev));
  }
  if (send)
    uv_async_send(&scp->async);
}

bool reserve_instance_event(rr_dicom_scp *scp) {
  std::lock_guard<std::mutex> lk(scp->mu);
  if (scp->events.size() + scp->reserved >= scp->max_events)
    return false;
  scp->reserved++;
  return true;
}

void unreserve_instance_event(rr_dicom_scp *scp) {
  std::lock_guard<std::mutex> lk(scp->mu);
  scp->reserved--;
}

void post_assoc(rr_dicom_scp *scp, const Conn *c, rr_dicom_assoc_kind_t kind, const char *reason,
                const T_ASC_RejectParameters *rj, unsigned contexts) {
  Event ev;
  ev.type = Event::ASSOC;
  ev.kind = kind;
  ev.assoc_id = c->id;
  ev.s[F_PEER] = c->peer;
  ev.s[F_CALLING] = c->calling;
  ev.s[F_CALLED] = c->called;
  ev.reason = reason;
  if (rj) {
    ev.rj_result = static_cast<int>(rj->result);
    ev.rj_source = static_cast<int>(rj->source);
    ev.rj_reason = static_cast<int>(rj->reason) & 0xFF;
  }
  ev.instances = c->instances;
  ev.size = c->bytes;
  ev.contexts = contexts;
  {
    std::lock_guard<std::mutex> lk(scp->mu);
    if (kind == RR_DICOM_ASSOC_ACCEPTED)
      scp->stats.accepted++;
    if (kind == RR_DICOM_ASSOC_REFUSED)
      scp->stats.refused++;
    if (kind == RR_DICOM_ASSOC_ENDED)
      scp->stats.ended++;
  }
  push_event(scp, std::move(ev), false);
}

uint64_t spool_free_bytes(const rr_dicom_scp *scp) {
  struct statvfs vfs;
  if (fstatvfs(scp->spool_fd, &vfs) != 0)
    return 0;
  return static_cast<uint64_t>(vfs.f_bavail) * static_cast<uint64_t>(vfs.f_frsize);
}

// ---- C-STORE ----------------------------------------------------------------

struct StoreCtx {
  rr_dicom_scp *scp;
  Conn *conn;
  std::string part;
  std::string final_path;
  bool discard;          // received into the null device
  Uint16 discard_status; // the answer then
};

std::string get_string(DcmItem *item, const DcmTagKey &tag) {
  OFString v;
  if (item && item->findAndGetOFStringArray(tag, v).good())
    return trim(v.c_str());
  return std::string();
}

// Durable write, header read and rename of a completely received file.
// Returns the C-STORE status.
Uint16 finish_instance(StoreCtx *ctx, const T_DIMSE_C_StoreRQ *req) {
  rr_dicom_scp *scp = ctx->scp;
  Conn *c = ctx->conn;
  const char *part = ctx->part.c_str();

  int fd = open(part, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    rr_log(RR_LOG_ERROR, kLogModule, "event=store_failed scp=%s assoc=%llu step=open err=\"%s\"",
           scp->name.c_str(), (unsigned long long)c->id, strerror(errno));
    unlink(part);
    return STATUS_STORE_Refused_OutOfResources;
  }
  struct stat st;
  if (fsync(fd) != 0 || fstat(fd, &st) != 0) {
    int e = errno;
    close(fd);
    rr_log(RR_LOG_ERROR, kLogModule, "event=store_failed scp=%s assoc=%llu step=fsync err=\"%s\"",
           scp->name.c_str(), (unsigned long long)c->id, strerror(e));
    unlink(part);
    return STATUS_STORE_Refused_OutOfResources;
  }
  close(fd);

  DcmFileFormat ff;
  OFCondition cond = ff.loadFileUntilTag(OFFilename(part), EXS_Unknown, EGL_noChange, 4096,
                                         ERM_autoDetect, DCM_PixelData);
  if (cond.bad()) {
    rr_log(RR_LOG_WARN, kLogModule,
           "event=store_failed scp=%s assoc=%llu step=parse bytes=%llu err=\"%s\"",
           scp->name.c_str(), (unsigned long long)c->id, (unsigned long long)st.st_size,
           cond.text());
    unlink(part);
    return STATUS_STORE_Error_CannotUnderstand;
  }
  DcmDataset *ds = ff.getDataset();
  DcmMetaInfo *meta = ff.getMetaInfo();

  Event ev;
  ev.type = Event::INSTANCE;
  ev.assoc_id = c->id;
  ev.size = static_cast<uint64_t>(st.st_size);
  ev.s[F_PATH] = ctx->final_path;
  ev.s[F_CALLING] = c->calling;
  ev.s[F_CALLED] = c->called;
  ev.s[F_PEER] = c->peer;
  ev.s[F_TS] = get_string(meta, DCM_TransferSyntaxUID);
  ev.s[F_SOP_CLASS] = get_string(ds, DCM_SOPClassUID);
  ev.s[F_SOP_INSTANCE] = get_string(ds, DCM_SOPInstanceUID);
  ev.s[F_STUDY] = get_string(ds, DCM_StudyInstanceUID);
  ev.s[F_SERIES] = get_string(ds, DCM_SeriesInstanceUID);
  ev.s[F_PATIENT_ID] = get_string(ds, DCM_PatientID);
  ev.s[F_ACCESSION] = get_string(ds, DCM_AccessionNumber);
  ev.s[F_MODALITY] = get_string(ds, DCM_Modality);
  ev.s[F_BODY_PART] = get_string(ds, DCM_BodyPartExamined);
  ev.s[F_STUDY_DESC] = get_string(ds, DCM_StudyDescription);
  ev.s[F_STUDY_DATE] = get_string(ds, DCM_StudyDate);
  ev.s[F_STUDY_TIME] = get_string(ds, DCM_StudyTime);
  ev.s[F_SERIES_NUMBER] = get_string(ds, DCM_SeriesNumber);
  ev.s[F_INSTANCE_NUMBER] = get_string(ds, DCM_InstanceNumber);
  if (ev.s[F_SOP_INSTANCE] != req->AffectedSOPInstanceUID) {
    rr_log(RR_LOG_WARN, kLogModule,
           "event=store_uid_mismatch scp=%s assoc=%llu detail=\"dataset SOP Instance UID differs "
           "from the C-STORE request\"",
           scp->name.c_str(), (unsigned long long)c->id);
  }

  if (!reserve_instance_event(scp)) {
    rr_log(RR_LOG_WARN, kLogModule, "event=store_failed scp=%s assoc=%llu step=queue limit=%zu",
           scp->name.c_str(), (unsigned long long)c->id, scp->max_events);
    unlink(part);
    return STATUS_STORE_Refused_OutOfResources;
  }
  if (rename(part, ctx->final_path.c_str()) != 0 || fsync(scp->spool_fd) != 0) {
    int e = errno;
    unreserve_instance_event(scp);
    rr_log(RR_LOG_ERROR, kLogModule, "event=store_failed scp=%s assoc=%llu step=rename err=\"%s\"",
           scp->name.c_str(), (unsigned long long)c->id, strerror(e));
    unlink(part);
    return STATUS_STORE_Refused_OutOfResources;
  }

  c->instances++;
  c->bytes += ev.size;
  {
    std::lock_guard<std::mutex> lk(scp->mu);
    scp->stats.instances++;
    scp->stats.bytes += ev.size;
  }
  rr_log(RR_LOG_INFO, kLogModule,
         "event=stored scp=%s assoc=%llu calling=%s bytes=%llu sop_class=%s modality=%s ts=%s",
         scp->name.c_str(), (unsigned long long)c->id, c->calling.c_str(),
         (unsigned long long)ev.size, ev.s[F_SOP_CLASS].c_str(), ev.s[F_MODALITY].c_str(),
         ev.s[F_TS].c_str());
  rr_log(RR_LOG_DEBUG, kLogModule,
         "event=stored_ids scp=%s assoc=%llu patient_id=%s study=%s series=%s sop_instance=%s",
         scp->name.c_str(), (unsigned long long)c->id, ev.s[F_PATIENT_ID].c_str(),
         ev.s[F_STUDY].c_str(), ev.s[F_SERIES].c_str(), ev.s[F_SOP_INSTANCE].c_str());
  if (!scp->confirm) {
    push_event(scp, std::move(ev), true);
    return STATUS_Success;
  }
  // The answer waits for the loop to record the instance (its commit).
  uint64_t token;
  {
    std::lock_guard<std::mutex> lk(scp->mu);
    token = ++scp->next_token;
    scp->confirmed[token] = -1;
  }
  ev.token = token;
  push_event(scp, std::move(ev), true);
  std::unique_lock<std::mutex> lk(scp->mu);
  bool answered = scp->confirm_cv.wait_for(lk, std::chrono::seconds(scp->dimse_timeout), [&] {
    return scp->confirmed[token] != -1 || scp->stopping.load();
  });
  int status = scp->confirmed[token];
  scp->confirmed.erase(token);
  if (answered && status == 0)
    return STATUS_Success;
  scp->stats.store_failures++;
  lk.unlock();
  rr_log(RR_LOG_WARN, kLogModule, "event=store_not_confirmed scp=%s assoc=%llu reason=%s",
         scp->name.c_str(), (unsigned long long)c->id,
         !answered      ? "timeout"
         : status == -1 ? "stopping"
                        : "not recorded");
  return STATUS_STORE_Refused_OutOfResources;
}

void store_progress(void *data, T_DIMSE_StoreProgress *progress, T_DIMSE_C_StoreRQ *req,
                    char * /*file*/, DcmDataset ** /*ds*/, T_DIMSE_C_StoreRSP *rsp,
                    DcmDataset ** /*detail*/) {
  if (progress->state != DIMSE_StoreEnd)
    return;
  StoreCtx *ctx = static_cast<StoreCtx *>(data);
  try {
    if (ctx->discard) {
      rsp->DimseStatus = ctx->discard_status;
    } else if (rsp->DimseStatus != STATUS_Success) {
      unlink(ctx->part.c_str());
    } else {
      rsp->DimseStatus = finish_instance(ctx, req);
    }
  } catch (...) {
    unlink(ctx->part.c_str());
    rsp->DimseStatus = STATUS_STORE_Refused_OutOfResources;
  }
}

// Serves one C-STORE-RQ. Returns DCMTK's condition (bad: the association is
// unusable).
OFCondition serve_store(rr_dicom_scp *scp, Conn *c, T_ASC_Association *assoc,
                        T_ASC_PresentationContextID pcid, T_DIMSE_C_StoreRQ *req) {
  StoreCtx ctx{scp, c, std::string(), std::string(), false, STATUS_Success};
  const char *uid = req->AffectedSOPInstanceUID;
  if (!valid_uid(uid)) {
    ctx.discard = true;
    ctx.discard_status = STATUS_STORE_Error_CannotUnderstand;
    rr_log(RR_LOG_WARN, kLogModule, "event=store_refused scp=%s assoc=%llu reason=bad_uid",
           scp->name.c_str(), (unsigned long long)c->id);
  } else {
    uint64_t free_bytes = spool_free_bytes(scp);
    if (free_bytes < scp->min_free) {
      ctx.discard = true;
      ctx.discard_status = STATUS_STORE_Refused_OutOfResources;
      rr_log(RR_LOG_WARN, kLogModule,
             "event=store_refused scp=%s assoc=%llu reason=disk_low free=%llu watermark=%llu",
             scp->name.c_str(), (unsigned long long)c->id, (unsigned long long)free_bytes,
             (unsigned long long)scp->min_free);
    }
  }
  if (!ctx.discard) {
    ctx.part = scp->spool + "/.rr-" + uid + "." + std::to_string(c->id) + "-" +
               std::to_string(++c->part_seq) + ".part";
    ctx.final_path = scp->spool + "/" + uid + ".dcm";
  }
  const char *target = ctx.discard ? NULL_DEVICE_NAME : ctx.part.c_str();
  OFCondition cond =
      DIMSE_storeProvider(assoc, pcid, req, target, ctx.discard ? OFFalse : OFTrue, NULL,
                          store_progress, &ctx, DIMSE_NONBLOCKING, scp->dimse_timeout);
  // DCMTK removes the file of a failed transfer; make sure of it.
  if (!ctx.discard)
    unlink(ctx.part.c_str());
  if (ctx.discard) {
    std::lock_guard<std::mutex> lk(scp->mu);
    scp->stats.store_failures++;
  }
  return cond;
}

// ---- association worker -----------------------------------------------------

void close_conn_fd(rr_dicom_scp *scp, Conn *c) {
  std::lock_guard<std::mutex> lk(scp->mu);
  if (c->fd >= 0)
    close(c->fd);
  c->fd = -1;
}

void reject(rr_dicom_scp *scp, Conn *c, T_ASC_Association *assoc,
            T_ASC_RejectParametersResult result, T_ASC_RejectParametersSource source,
            T_ASC_RejectParametersReason reason, const char *why) {
  T_ASC_RejectParameters rj = {result, source, reason};
  OFCondition cond = ASC_rejectAssociation(assoc, &rj);
  rr_log(RR_LOG_WARN, kLogModule,
         "event=assoc_refused scp=%s assoc=%llu peer=%s calling=%s called=%s reason=\"%s\" "
         "result=%d source=%d diag=%d sent=%d",
         scp->name.c_str(), (unsigned long long)c->id, c->peer.c_str(), c->calling.c_str(),
         c->called.c_str(), why, static_cast<int>(result), static_cast<int>(source),
         static_cast<int>(reason) & 0xFF, cond.good() ? 1 : 0);
  post_assoc(scp, c, RR_DICOM_ASSOC_REFUSED, why, &rj, 0);
}

bool calling_allowed(const rr_dicom_scp *scp, const std::string &ae) {
  if (scp->any_calling_ae)
    return true;
  for (const std::string &a : scp->calling_aes)
    if (a == ae)
      return true;
  return false;
}

// Runs the association after the A-ASSOCIATE-AC until it ends; returns how.
const char *serve(rr_dicom_scp *scp, Conn *c, T_ASC_Association *assoc) {
  for (;;) {
    T_ASC_PresentationContextID pcid = 0;
    T_DIMSE_Message msg;
    memset(&msg, 0, sizeof(msg));
    DcmDataset *detail = NULL;
    OFCondition cond =
        DIMSE_receiveCommand(assoc, DIMSE_NONBLOCKING, scp->idle_timeout, &pcid, &msg, &detail);
    delete detail;
    if (cond == DUL_PEERREQUESTEDRELEASE) {
      ASC_acknowledgeRelease(assoc);
      return "released";
    }
    // A socket shut down by rr_dicom_scp_stop reads as a peer abort.
    if (cond.bad() && scp->stopping.load())
      return "stopped";
    if (cond == DUL_PEERABORTEDASSOCIATION)
      return "aborted by peer";
    if (cond == DIMSE_NODATAAVAILABLE) {
      ASC_abortAssociation(assoc);
      return "idle timeout";
    }
    if (cond.bad()) {
      ASC_abortAssociation(assoc);
      return scp->stopping.load() ? "stopped" : "network error";
    }
    switch (msg.CommandField) {
    case DIMSE_C_ECHO_RQ:
      cond = DIMSE_sendEchoResponse(assoc, pcid, &msg.msg.CEchoRQ, STATUS_Success, NULL);
      break;
    case DIMSE_C_STORE_RQ:
      cond = serve_store(scp, c, assoc, pcid, &msg.msg.CStoreRQ);
      if (cond.bad() && scp->stopping.load())
        return "stopped";
      if (cond == DUL_PEERABORTEDASSOCIATION)
        return "aborted by peer";
      break;
    default:
      rr_log(RR_LOG_WARN, kLogModule, "event=unsupported_command scp=%s assoc=%llu command=0x%04x",
             scp->name.c_str(), (unsigned long long)c->id, static_cast<unsigned>(msg.CommandField));
      ASC_abortAssociation(assoc);
      return "unsupported command";
    }
    if (cond.bad()) {
      ASC_abortAssociation(assoc);
      return scp->stopping.load() ? "stopped" : "transfer failed";
    }
  }
}

// Runs the server side of the TLS handshake on dfd within the ACSE timeout.
// Returns NULL with *out the connection (owning dfd), or how the connection
// ended (dfd closed, REFUSED posted).
const char *tls_handshake(rr_dicom_scp *scp, Conn *c, int dfd,
                          std::unique_ptr<DcmTransportConnection> *out) {
  std::unique_ptr<DcmTransportConnection> t(scp->tls->createConnection(dfd, OFTrue));
  if (!t) {
    close(dfd);
    post_assoc(scp, c, RR_DICOM_ASSOC_REFUSED, "TLS set-up failed", NULL, 0);
    return "TLS set-up failed";
  }
  struct timeval tv = {scp->acse_timeout, 0}, none = {0, 0};
  setsockopt(dfd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  setsockopt(dfd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  OFCondition cond = t->serverSideHandshake();
  setsockopt(dfd, SOL_SOCKET, SO_RCVTIMEO, &none, sizeof(none));
  setsockopt(dfd, SOL_SOCKET, SO_SNDTIMEO, &none, sizeof(none));
  if (cond.bad()) {
    const char *how = "TLS handshake failed";
    rr_log(RR_LOG_WARN, kLogModule,
           "event=assoc_refused scp=%s assoc=%llu peer=%s reason=\"%s\" err=\"%s\"",
           scp->name.c_str(), (unsigned long long)c->id, c->peer.c_str(), how, cond.text());
    t.reset(); // closes dfd
    post_assoc(scp, c, RR_DICOM_ASSOC_REFUSED, how, NULL, 0);
    return how;
  }
  *out = std::move(t);
  return NULL;
}

// Reads the A-ASSOCIATE-RQ, refuses or accepts it and serves it. *assoc is
// what DCMTK created (the caller frees it); *accepted tells whether an
// A-ASSOCIATE-AC went out. Returns how the connection ended.
const char *session(rr_dicom_scp *scp, Conn *c, T_ASC_Association **assoc, bool *accepted) {
  // Wait for the first bytes outside the lock, so that a silent peer does
  // not hold up the negotiation of the others.
  struct pollfd p = {c->fd, POLLIN, 0};
  int n;
  do {
    n = poll(&p, 1, scp->acse_timeout * 1000);
  } while (n < 0 && errno == EINTR);
  if (n <= 0) {
    const char *how = n == 0 ? "no A-ASSOCIATE-RQ within the ACSE timeout" : "network error";
    rr_log(RR_LOG_WARN, kLogModule, "event=assoc_refused scp=%s assoc=%llu peer=%s reason=\"%s\"",
           scp->name.c_str(), (unsigned long long)c->id, c->peer.c_str(), how);
    post_assoc(scp, c, RR_DICOM_ASSOC_REFUSED, how, NULL, 0);
    return how;
  }
  int dfd = fcntl(c->fd, F_DUPFD_CLOEXEC, 3);
  if (dfd < 0) {
    post_assoc(scp, c, RR_DICOM_ASSOC_REFUSED, "out of file descriptors", NULL, 0);
    return "out of file descriptors";
  }
  std::unique_ptr<DcmTransportConnection> tls;
  if (scp->tls) {
    const char *how = tls_handshake(scp, c, dfd, &tls);
    if (how)
      return how;
  }
  OFCondition cond;
  bool handed_over = false;
  {
    std::lock_guard<std::mutex> lk(g_receive_mutex);
    dcmExternalSocketHandle.set(dfd);
    t_handoff = tls.get();
    cond = ASC_receiveAssociation(scp->net, assoc, scp->max_pdu, NULL, NULL,
                                  scp->tls ? OFTrue : OFFalse, DUL_NOBLOCK, scp->acse_timeout);
    handed_over = tls && t_handoff == nullptr;
    t_handoff = nullptr;
    dcmExternalSocketHandle.set(DCMNET_INVALID_SOCKET);
  }
  if (tls) {
    // Once handed over, DCMTK owns the connection (and closes dfd with it);
    // otherwise deleting it closes dfd.
    if (handed_over)
      (void)tls.release();
    else
      tls.reset();
  } else if (*assoc == NULL || (*assoc)->DULassociation == NULL) {
    // DCMTK owns the dup once it made a transport connection of it.
    close(dfd);
  }
  if (cond.bad()) {
    const char *how = "no valid A-ASSOCIATE-RQ";
    rr_log(RR_LOG_WARN, kLogModule,
           "event=assoc_refused scp=%s assoc=%llu peer=%s reason=\"%s\" err=\"%s\"",
           scp->name.c_str(), (unsigned long long)c->id, c->peer.c_str(), how, cond.text());
    post_assoc(scp, c, RR_DICOM_ASSOC_REFUSED, how, NULL, 0);
    return how;
  }
  T_ASC_Association *a = *assoc;
  char calling[64] = "", called[64] = "", ctxname[128] = "";
  ASC_getAPTitles(a->params, calling, sizeof(calling), called, sizeof(called), NULL, 0);
  ASC_getApplicationContextName(a->params, ctxname, sizeof(ctxname));
  c->calling = trim(calling);
  c->called = trim(called);

  if (c->verdict == V_ADDRESS) {
    reject(scp, c, a, ASC_RESULT_REJECTEDPERMANENT, ASC_SOURCE_SERVICEUSER, ASC_REASON_SU_NOREASON,
           "peer address not allowed");
    return "refused";
  }
  if (strcmp(ctxname, UID_StandardApplicationContext) != 0) {
    reject(scp, c, a, ASC_RESULT_REJECTEDPERMANENT, ASC_SOURCE_SERVICEUSER,
           ASC_REASON_SU_APPCONTEXTNAMENOTSUPPORTED, "application context not supported");
    return "refused";
  }
  if (c->called != scp->ae_title) {
    reject(scp, c, a, ASC_RESULT_REJECTEDPERMANENT, ASC_SOURCE_SERVICEUSER,
           ASC_REASON_SU_CALLEDAETITLENOTRECOGNIZED, "called AE title not recognized");
    return "refused";
  }
  if (!calling_allowed(scp, c->calling)) {
    reject(scp, c, a, ASC_RESULT_REJECTEDPERMANENT, ASC_SOURCE_SERVICEUSER,
           ASC_REASON_SU_CALLINGAETITLENOTRECOGNIZED, "calling AE title not recognized");
    return "refused";
  }
  if (c->verdict == V_LIMIT) {
    reject(scp, c, a, ASC_RESULT_REJECTEDTRANSIENT, ASC_SOURCE_SERVICEPROVIDER_PRESENTATION_RELATED,
           ASC_REASON_SP_PRES_LOCALLIMITEXCEEDED, "association limit reached");
    return "refused";
  }
  if (spool_free_bytes(scp) < scp->min_free) {
    reject(scp, c, a, ASC_RESULT_REJECTEDTRANSIENT, ASC_SOURCE_SERVICEPROVIDER_PRESENTATION_RELATED,
           ASC_REASON_SP_PRES_TEMPORARYCONGESTION, "spool free space below the watermark");
    return "refused";
  }
  const char *verification[] = {UID_VerificationSOPClass};
  cond = ASC_acceptContextsWithPreferredTransferSyntaxes(
      a->params, verification, 1, const_cast<const char **>(kEchoTransferSyntaxes),
      static_cast<int>(sizeof(kEchoTransferSyntaxes) / sizeof(kEchoTransferSyntaxes[0])));
  if (cond.good())
    cond = ASC_acceptContextsWithPreferredTransferSyntaxes(
        a->params, const_cast<const char **>(scp->sop_classes.data()),
        static_cast<int>(scp->sop_classes.size()), const_cast<const char **>(kTransferSyntaxes),
        static_cast<int>(sizeof(kTransferSyntaxes) / sizeof(kTransferSyntaxes[0])));
  if (cond.good())
    cond = ASC_acknowledgeAssociation(a);
  if (cond.bad()) {
    const char *how = "negotiation failed";
    rr_log(RR_LOG_WARN, kLogModule,
           "event=assoc_refused scp=%s assoc=%llu peer=%s calling=%s reason=\"%s\" err=\"%s\"",
           scp->name.c_str(), (unsigned long long)c->id, c->peer.c_str(), c->calling.c_str(), how,
           cond.text());
    post_assoc(scp, c, RR_DICOM_ASSOC_REFUSED, how, NULL, 0);
    return how;
  }
  *accepted = true;
  unsigned nctx = static_cast<unsigned>(ASC_countAcceptedPresentationContexts(a->params));
  rr_log(RR_LOG_INFO, kLogModule,
         "event=assoc_accepted scp=%s assoc=%llu peer=%s calling=%s called=%s contexts=%u",
         scp->name.c_str(), (unsigned long long)c->id, c->peer.c_str(), c->calling.c_str(),
         c->called.c_str(), nctx);
  post_assoc(scp, c, RR_DICOM_ASSOC_ACCEPTED, "accepted", NULL, nctx);
  return serve(scp, c, a);
}

void run_conn(rr_dicom_scp *scp, Conn *c) {
  T_ASC_Association *assoc = NULL;
  bool accepted = false;
  const char *how;
  try {
    how = session(scp, c, &assoc, &accepted);
  } catch (...) {
    how = "internal error";
    if (assoc && assoc->DULassociation)
      ASC_abortAssociation(assoc);
  }
  if (accepted) {
    rr_log(
        RR_LOG_INFO, kLogModule,
        "event=assoc_ended scp=%s assoc=%llu peer=%s calling=%s how=\"%s\" instances=%u bytes=%llu",
        scp->name.c_str(), (unsigned long long)c->id, c->peer.c_str(), c->calling.c_str(), how,
        c->instances, (unsigned long long)c->bytes);
    try {
      post_assoc(scp, c, RR_DICOM_ASSOC_ENDED, how, NULL, 0);
    } catch (...) {
      std::lock_guard<std::mutex> lk(scp->mu);
      scp->stats.dropped_events++;
    }
  }
  if (assoc) {
    ASC_dropSCPAssociation(assoc);
    ASC_destroyAssociation(&assoc);
  }
  close_conn_fd(scp, c);
  std::lock_guard<std::mutex> lk(scp->mu);
  if (c->holds_slot)
    scp->active--;
  else
    scp->rejecting--;
  scp->live--;
  c->done = true;
  scp->workers_cv.notify_all();
}

// ---- acceptor ---------------------------------------------------------------

void reap_finished(rr_dicom_scp *scp) {
  std::list<std::unique_ptr<Conn>> finished;
  {
    std::lock_guard<std::mutex> lk(scp->mu);
    for (auto it = scp->conns.begin(); it != scp->conns.end();) {
      if ((*it)->done) {
        finished.push_back(std::move(*it));
        it = scp->conns.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto &c : finished)
    c->th.join();
}

std::string peer_text(const sockaddr_storage &ss, int *family, unsigned char *addr) {
  char buf[INET6_ADDRSTRLEN] = "";
  memset(addr, 0, 16);
  if (ss.ss_family == AF_INET6) {
    const sockaddr_in6 *s6 = reinterpret_cast<const sockaddr_in6 *>(&ss);
    if (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr)) {
      *family = AF_INET;
      memcpy(addr, s6->sin6_addr.s6_addr + 12, 4);
      inet_ntop(AF_INET, addr, buf, sizeof(buf));
    } else {
      *family = AF_INET6;
      memcpy(addr, s6->sin6_addr.s6_addr, 16);
      inet_ntop(AF_INET6, addr, buf, sizeof(buf));
    }
  } else {
    const sockaddr_in *s4 = reinterpret_cast<const sockaddr_in *>(&ss);
    *family = AF_INET;
    memcpy(addr, &s4->sin_addr, 4);
    inet_ntop(AF_INET, addr, buf, sizeof(buf));
  }
  return buf;
}

void handle_accept(rr_dicom_scp *scp, int fd, const sockaddr_storage &ss) {
  int one = 1;
  if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) != 0)
    rr_log(RR_LOG_WARN, kLogModule, "event=nodelay_failed scp=%s err=\"%s\"", scp->name.c_str(),
           strerror(errno));
  int family = 0;
  unsigned char addr[16];
  std::unique_ptr<Conn> c(new Conn());
  c->fd = fd;
  c->peer = peer_text(ss, &family, addr);
  bool addr_ok = false;
  for (const PeerRule &r : scp->peers)
    if (rule_matches(r, family, addr))
      addr_ok = true;

  Conn *raw = c.get();
  bool over = false;
  {
    std::lock_guard<std::mutex> lk(scp->mu);
    c->id = ++scp->next_id;
    if (addr_ok && scp->active < scp->max_assoc) {
      scp->active++;
      c->holds_slot = true;
      c->verdict = V_OK;
    } else if (scp->rejecting < RR_DICOM_SCP_REJECT_SLOTS) {
      scp->rejecting++;
      c->verdict = addr_ok ? V_LIMIT : V_ADDRESS;
    } else {
      over = true;
    }
    if (!over) {
      scp->live++;
      scp->conns.push_back(std::move(c));
    }
  }
  if (over) {
    close(fd);
    rr_log(RR_LOG_WARN, kLogModule,
           "event=assoc_refused scp=%s assoc=%llu peer=%s reason=\"too many connections\"",
           scp->name.c_str(), (unsigned long long)c->id, c->peer.c_str());
    post_assoc(scp, c.get(), RR_DICOM_ASSOC_REFUSED, "too many connections", NULL, 0);
    return;
  }
  try {
    raw->th = std::thread(run_conn, scp, raw);
  } catch (...) {
    rr_log(RR_LOG_ERROR, kLogModule, "event=thread_failed scp=%s assoc=%llu peer=%s",
           scp->name.c_str(), (unsigned long long)raw->id, raw->peer.c_str());
    close_conn_fd(scp, raw);
    std::lock_guard<std::mutex> lk(scp->mu);
    if (raw->holds_slot)
      scp->active--;
    else
      scp->rejecting--;
    scp->live--;
    scp->conns.remove_if([raw](const std::unique_ptr<Conn> &p) { return p.get() == raw; });
  }
}

void acceptor_main(rr_dicom_scp *scp) {
  while (!scp->stopping.load()) {
    struct pollfd p[2] = {{scp->listen_fd, POLLIN, 0}, {scp->wake_fd, POLLIN, 0}};
    int n = poll(p, 2, -1);
    if (n < 0 && errno != EINTR)
      break;
    if (scp->stopping.load())
      break;
    if (n <= 0 || !(p[0].revents & POLLIN))
      continue;
    reap_finished(scp);
    sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    int fd = accept4(scp->listen_fd, reinterpret_cast<sockaddr *>(&ss), &sl, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
        rr_log(RR_LOG_WARN, kLogModule, "event=accept_failed scp=%s err=\"%s\"", scp->name.c_str(),
               strerror(errno));
        struct pollfd w = {scp->wake_fd, POLLIN, 0};
        poll(&w, 1, 100); // back off; the wake fd still ends the wait at stop
      }
      continue;
    }
    try {
      handle_accept(scp, fd, ss);
    } catch (...) {
      close(fd);
    }
  }

  // Stop: no new connections; running ones get until the deadline.
  close(scp->listen_fd);
  scp->listen_fd = -1;
  {
    std::unique_lock<std::mutex> lk(scp->mu);
    auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(scp->deadline_ms);
    scp->workers_cv.wait_until(lk, until, [scp] { return scp->live == 0; });
    unsigned cut = 0;
    for (auto &c : scp->conns) {
      if (!c->done && c->fd >= 0) {
        shutdown(c->fd, SHUT_RDWR);
        cut++;
      }
    }
    if (cut)
      rr_log(RR_LOG_WARN, kLogModule, "event=stop_cut scp=%s associations=%u", scp->name.c_str(),
             cut);
  }
  std::list<std::unique_ptr<Conn>> all;
  {
    std::lock_guard<std::mutex> lk(scp->mu);
    all.swap(scp->conns);
  }
  for (auto &c : all)
    c->th.join();
  ASC_dropNetwork(&scp->net);
  {
    std::lock_guard<std::mutex> lk(scp->mu);
    Event ev;
    ev.type = Event::STOPPED;
    scp->events.push_back(std::move(ev));
  }
  uv_async_send(&scp->async);
}

// ---- loop side --------------------------------------------------------------

void deliver(rr_dicom_scp *scp, const Event &ev) {
  if (ev.type == Event::INSTANCE) {
    rr_dicom_instance_t in;
    in.assoc_id = ev.assoc_id;
    in.size = ev.size;
    in.path = ev.s[F_PATH].c_str();
    in.calling_ae = ev.s[F_CALLING].c_str();
    in.called_ae = ev.s[F_CALLED].c_str();
    in.peer = ev.s[F_PEER].c_str();
    in.transfer_syntax_uid = ev.s[F_TS].c_str();
    in.sop_class_uid = ev.s[F_SOP_CLASS].c_str();
    in.sop_instance_uid = ev.s[F_SOP_INSTANCE].c_str();
    in.study_instance_uid = ev.s[F_STUDY].c_str();
    in.series_instance_uid = ev.s[F_SERIES].c_str();
    in.patient_id = ev.s[F_PATIENT_ID].c_str();
    in.accession_number = ev.s[F_ACCESSION].c_str();
    in.modality = ev.s[F_MODALITY].c_str();
    in.body_part_examined = ev.s[F_BODY_PART].c_str();
    in.study_description = ev.s[F_STUDY_DESC].c_str();
    in.study_date = ev.s[F_STUDY_DATE].c_str();
    in.study_time = ev.s[F_STUDY_TIME].c_str();
    in.series_number = ev.s[F_SERIES_NUMBER].c_str();
    in.instance_number = ev.s[F_INSTANCE_NUMBER].c_str();
    in.token = ev.token;
    scp->cb.on_instance(scp->ud, &in);
  } else if (ev.type == Event::ASSOC && scp->cb.on_association) {
    rr_dicom_assoc_event_t ae;
    ae.kind = ev.kind;
    ae.assoc_id = ev.assoc_id;
    ae.peer = ev.s[F_PEER].c_str();
    ae.calling_ae = ev.s[F_CALLING].c_str();
    ae.called_ae = ev.s[F_CALLED].c_str();
    ae.reject_result = ev.rj_result;
    ae.reject_source = ev.rj_source;
    ae.reject_reason = ev.rj_reason;
    ae.reason = ev.reason;
    ae.instances = ev.instances;
    ae.bytes = ev.size;
    ae.accepted_contexts = ev.contexts;
    scp->cb.on_association(scp->ud, &ae);
  }
}

void on_async_closed(uv_handle_t *h) {
  rr_dicom_scp *scp = static_cast<rr_dicom_scp *>(h->data);
  rr_dicom_scp_stopped_cb cb = scp->stopped_cb;
  void *ud = scp->stopped_ud;
  if (scp->wake_fd >= 0)
    close(scp->wake_fd);
  if (scp->spool_fd >= 0)
    close(scp->spool_fd);
  delete scp;
  if (cb)
    cb(ud);
}

void on_async(uv_async_t *h) {
  rr_dicom_scp *scp = static_cast<rr_dicom_scp *>(h->data);
  std::deque<Event> batch;
  {
    std::lock_guard<std::mutex> lk(scp->mu);
    batch.swap(scp->events);
  }
  bool stopped = false;
  for (const Event &ev : batch) {
    if (ev.type == Event::STOPPED)
      stopped = true;
    else
      deliver(scp, ev);
  }
  if (stopped) {
    scp->acceptor.join();
    rr_log(RR_LOG_INFO, kLogModule, "event=stopped scp=%s", scp->name.c_str());
    uv_close(reinterpret_cast<uv_handle_t *>(&scp->async), on_async_closed);
  }
}

void remove_stale_parts(rr_dicom_scp *scp) {
  DIR *d = opendir(scp->spool.c_str());
  if (!d)
    return;
  unsigned removed = 0;
  while (struct dirent *e = readdir(d)) {
    size_t n = strlen(e->d_name);
    if (n > 9 && strncmp(e->d_name, ".rr-", 4) == 0 && strcmp(e->d_name + n - 5, ".part") == 0) {
      if (unlinkat(dirfd(d), e->d_name, 0) == 0)
        removed++;
    }
  }
  closedir(d);
  if (removed)
    rr_log(RR_LOG_WARN, kLogModule, "event=stale_parts_removed scp=%s count=%u", scp->name.c_str(),
           removed);
}

int bind_listener(rr_dicom_scp *scp) {
  sockaddr_storage ss;
  memset(&ss, 0, sizeof(ss));
  socklen_t sl;
  int family;
  sockaddr_in *s4 = reinterpret_cast<sockaddr_in *>(&ss);
  sockaddr_in6 *s6 = reinterpret_cast<sockaddr_in6 *>(&ss);
  if (inet_pton(AF_INET, scp->host.c_str(), &s4->sin_addr) == 1) {
    family = AF_INET;
    s4->sin_family = AF_INET;
    s4->sin_port = htons(static_cast<uint16_t>(scp->port));
    sl = sizeof(*s4);
  } else if (inet_pton(AF_INET6, scp->host.c_str(), &s6->sin6_addr) == 1) {
    family = AF_INET6;
    s6->sin6_family = AF_INET6;
    s6->sin6_port = htons(static_cast<uint16_t>(scp->port));
    sl = sizeof(*s6);
  } else {
    return RR_EINVAL;
  }
  int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -errno;
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  if (bind(fd, reinterpret_cast<sockaddr *>(&ss), sl) != 0 || listen(fd, 64) != 0) {
    int e = -errno;
    close(fd);
    return e;
  }
  sl = sizeof(ss);
  if (getsockname(fd, reinterpret_cast<sockaddr *>(&ss), &sl) != 0) {
    int e = -errno;
    close(fd);
    return e;
  }
  scp->port = ntohs(family == AF_INET ? s4->sin_port : s6->sin6_port);
  scp->listen_fd = fd;
  return 0;
}

int configure(rr_dicom_scp *scp, const rr_dicom_scp_config_t *cfg) {
  scp->name = cfg->name && *cfg->name ? cfg->name : "dicom";
  scp->host = cfg->host && *cfg->host ? cfg->host : "0.0.0.0";
  if (cfg->port < 0 || cfg->port > 65535)
    return RR_EINVAL;
  scp->port = cfg->port;
  if (!cfg->ae_title)
    return RR_EINVAL;
  scp->ae_title = trim(cfg->ae_title);
  if (scp->ae_title.empty() || scp->ae_title.size() > 16)
    return RR_EINVAL;
  for (size_t i = 0; i < cfg->n_allowed_calling_aes; i++) {
    if (!cfg->allowed_calling_aes || !cfg->allowed_calling_aes[i])
      return RR_EINVAL;
    std::string a = trim(cfg->allowed_calling_aes[i]);
    if (a == "*")
      scp->any_calling_ae = true;
    else
      scp->calling_aes.push_back(a);
  }
  for (size_t i = 0; i < cfg->n_allowed_peers; i++) {
    if (!cfg->allowed_peers || !cfg->allowed_peers[i])
      return RR_EINVAL;
    PeerRule r;
    if (parse_peer_rule(cfg->allowed_peers[i], &r) != 0)
      return RR_EINVAL;
    scp->peers.push_back(r);
  }
  if (cfg->sop_classes && cfg->n_sop_classes) {
    for (size_t i = 0; i < cfg->n_sop_classes; i++) {
      if (!cfg->sop_classes[i] || !valid_uid(cfg->sop_classes[i]))
        return RR_EINVAL;
      scp->sop_class_store.push_back(cfg->sop_classes[i]);
    }
    for (const std::string &s : scp->sop_class_store)
      scp->sop_classes.push_back(s.c_str());
  } else {
    for (int i = 0; i < numberOfDcmAllStorageSOPClassUIDs; i++)
      scp->sop_classes.push_back(dcmAllStorageSOPClassUIDs[i]);
  }
  scp->max_assoc = cfg->max_associations ? cfg->max_associations : 8;
  if (!cfg->spool_dir || !*cfg->spool_dir)
    return RR_EINVAL;
  scp->spool = cfg->spool_dir;
  while (scp->spool.size() > 1 && scp->spool.back() == '/')
    scp->spool.pop_back();
  scp->min_free = cfg->min_free_bytes ? cfg->min_free_bytes : (uint64_t(1) << 30);
  if (cfg->acse_timeout_s > 3600 || cfg->dimse_timeout_s > 3600 || cfg->idle_timeout_s > 86400)
    return RR_EINVAL;
  scp->acse_timeout = cfg->acse_timeout_s ? static_cast<int>(cfg->acse_timeout_s) : 30;
  scp->dimse_timeout = cfg->dimse_timeout_s ? static_cast<int>(cfg->dimse_timeout_s) : 60;
  scp->idle_timeout = cfg->idle_timeout_s ? static_cast<int>(cfg->idle_timeout_s) : 120;
  if (cfg->max_pdu && (cfg->max_pdu < 4096 || cfg->max_pdu > 131072))
    return RR_EINVAL;
  scp->max_pdu = cfg->max_pdu ? static_cast<long>(cfg->max_pdu) : 65536;
  scp->max_events = cfg->max_pending_events ? cfg->max_pending_events : 10000;
  scp->confirm = cfg->confirm != 0;
  if (cfg->tls) {
    std::string why;
    scp->tls = rr_dicom::make_tls_layer(NET_ACCEPTOR, *cfg->tls, std::string(), &why);
    if (!scp->tls) {
      rr_log(RR_LOG_ERROR, kLogModule, "event=start_failed scp=%s reason=\"TLS: %s\"",
             scp->name.c_str(), why.c_str());
      return RR_DICOM_ETLS;
    }
  }
  return 0;
}

int start(uv_loop_t *loop, const rr_dicom_scp_config_t *cfg, const rr_dicom_scp_callbacks_t *cb,
          void *ud, rr_dicom_scp_t **out) {
  if (!loop || !cfg || !cb || !cb->on_instance || !out)
    return RR_EINVAL;
  std::call_once(g_dcmtk_once, dcmtk_global_setup);
  if (!dcmDataDict.isDictionaryLoaded()) {
    rr_log(RR_LOG_ERROR, kLogModule,
           "event=start_failed reason=\"DICOM data dictionary not loaded\"");
    return RR_DICOM_EDCMTK;
  }
  std::unique_ptr<rr_dicom_scp> scp(new rr_dicom_scp());
  int rc = configure(scp.get(), cfg);
  if (rc != 0)
    return rc;
  scp->loop = loop;
  scp->cb = *cb;
  scp->ud = ud;

  scp->spool_fd = open(scp->spool.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (scp->spool_fd < 0)
    return RR_EINVAL;
  struct Guard {
    rr_dicom_scp *s;
    ~Guard() {
      if (!s)
        return;
      if (s->spool_fd >= 0)
        close(s->spool_fd);
      if (s->listen_fd >= 0)
        close(s->listen_fd);
      if (s->wake_fd >= 0)
        close(s->wake_fd);
      if (s->net)
        ASC_dropNetwork(&s->net);
    }
  } guard{scp.get()};
  if (access(scp->spool.c_str(), W_OK) != 0)
    return RR_EINVAL;
  remove_stale_parts(scp.get());

  rc = bind_listener(scp.get());
  if (rc != 0) {
    rr_log(RR_LOG_ERROR, kLogModule, "event=start_failed scp=%s host=%s port=%d err=\"%s\"",
           scp->name.c_str(), scp->host.c_str(), scp->port, rr_strerror(rc));
    return rc;
  }
  scp->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (scp->wake_fd < 0)
    return -errno;

  // The DCMTK network only parses A-ASSOCIATE-RQs of sockets we accepted and
  // hand over; DCMTK 3.6.7 binds it to INADDR_ANY, so its own listening
  // socket is closed at once and never accepts anything.
  OFCondition cond = ASC_initializeNetwork(NET_ACCEPTOR, 0, scp->acse_timeout, &scp->net);
  if (cond.bad()) {
    rr_log(RR_LOG_ERROR, kLogModule, "event=start_failed scp=%s err=\"%s\"", scp->name.c_str(),
           cond.text());
    return RR_DICOM_EDCMTK;
  }
  PRIVATE_NETWORKKEY *key = reinterpret_cast<PRIVATE_NETWORKKEY *>(scp->net->network);
  if (key->networkSpecific.TCP.listenSocket >= 0)
    close(key->networkSpecific.TCP.listenSocket);
  key->networkSpecific.TCP.listenSocket = DCMNET_INVALID_SOCKET;
  if (scp->tls) {
    cond = ASC_setTransportLayer(scp->net, &scp->handoff, 0);
    if (cond.bad()) {
      rr_log(RR_LOG_ERROR, kLogModule, "event=start_failed scp=%s err=\"%s\"", scp->name.c_str(),
             cond.text());
      return RR_DICOM_EDCMTK;
    }
  }

  rc = uv_async_init(loop, &scp->async, on_async);
  if (rc != 0)
    return rc;
  scp->async.data = scp.get();
  try {
    scp->acceptor = std::thread(acceptor_main, scp.get());
  } catch (...) {
    // The async handle exists: it must be closed through the loop, so the
    // half-built SCP goes the normal stop path without an acceptor.
    rr_log(RR_LOG_ERROR, kLogModule, "event=start_failed scp=%s err=\"thread\"", scp->name.c_str());
    guard.s = nullptr;
    rr_dicom_scp *s = scp.release();
    close(s->listen_fd);
    s->listen_fd = -1;
    ASC_dropNetwork(&s->net);
    s->stop_called = true;
    uv_close(reinterpret_cast<uv_handle_t *>(&s->async), on_async_closed);
    return RR_DICOM_EINTERNAL;
  }
  rr_log(RR_LOG_INFO, kLogModule,
         "event=listening scp=%s host=%s port=%d ae=%s max_associations=%u sop_classes=%zu "
         "watermark=%llu tls=%d",
         scp->name.c_str(), scp->host.c_str(), scp->port, scp->ae_title.c_str(), scp->max_assoc,
         scp->sop_classes.size(), (unsigned long long)scp->min_free, scp->tls ? 1 : 0);
  guard.s = nullptr;
  *out = scp.release();
  return 0;
}

} // namespace

extern "C" int rr_dicom_scp_start(uv_loop_t *loop, const rr_dicom_scp_config_t *cfg,
                                  const rr_dicom_scp_callbacks_t *cb, void *ud,
                                  rr_dicom_scp_t **out) {
  try {
    return start(loop, cfg, cb, ud, out);
  } catch (const std::bad_alloc &) {
    return RR_ENOMEM;
  } catch (...) {
    return RR_DICOM_EINTERNAL;
  }
}

extern "C" int rr_dicom_scp_port(const rr_dicom_scp_t *scp) {
  return scp ? scp->port : 0;
}

extern "C" void rr_dicom_scp_stats(const rr_dicom_scp_t *scp, rr_dicom_scp_stats_t *out) {
  if (!scp || !out)
    return;
  std::lock_guard<std::mutex> lk(scp->mu);
  *out = scp->stats;
  out->active = scp->active;
}

extern "C" void rr_dicom_scp_stop(rr_dicom_scp_t *scp, uint64_t deadline_ms,
                                  rr_dicom_scp_stopped_cb stopped_cb, void *ud) {
  if (!scp || scp->stop_called)
    return;
  scp->stop_called = true;
  scp->deadline_ms = deadline_ms;
  scp->stopped_cb = stopped_cb;
  scp->stopped_ud = ud;
  rr_log(RR_LOG_INFO, kLogModule, "event=stopping scp=%s deadline_ms=%llu", scp->name.c_str(),
         (unsigned long long)deadline_ms);
  scp->stopping.store(true);
  {
    std::lock_guard<std::mutex> lk(scp->mu);
    scp->confirm_cv.notify_all(); // C-STOREs waiting for a confirmation give up
  }
  uint64_t one = 1;
  ssize_t n = write(scp->wake_fd, &one, sizeof(one));
  (void)n; // an eventfd write only fails when the counter is saturated: already woken
}

extern "C" void rr_dicom_scp_confirm(rr_dicom_scp_t *scp, uint64_t token, int status) {
  if (!scp || token == 0)
    return;
  std::lock_guard<std::mutex> lk(scp->mu);
  auto it = scp->confirmed.find(token);
  if (it == scp->confirmed.end())
    return;
  it->second = status == 0 ? 0 : 1;
  scp->confirm_cv.notify_all();
}

extern "C" const char *rr_dicom_scp_strerror(int code) {
  switch (code) {
  case RR_DICOM_EDCMTK: return "DCMTK error";
  case RR_DICOM_EINTERNAL: return "internal error in the DICOM layer";
  case RR_DICOM_ETLS: return "DICOM TLS set-up failed";
  default: return rr_strerror(code);
  }
}
