// Private to engine/dicom (C++ only): what scp.cc and scu.cc share.
#ifndef RR_DICOM_INT_H
#define RR_DICOM_INT_H

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmnet/assoc.h>
#include <dcmtk/dcmtls/tlslayer.h>

#include <memory>
#include <string>

#include "dicom/scp.h"

namespace rr_dicom {

// make_tls_layer: a DcmTLSTransportLayer for role with the BCP 195
// non-downgrading policy of scp.h (TLS >= 1.2, AEAD + forward secrecy) and
// the files of cfg. For a requestor the peer's certificate is always
// verified against cfg.ca_file and must name peer_host (DNS name or IP
// address). Returns nullptr and sets *why on failure. Any thread.
std::unique_ptr<DcmTLSTransportLayer> make_tls_layer(T_ASC_NetworkRole role,
                                                     const rr_dicom_tls_config_t &cfg,
                                                     const std::string &peer_host,
                                                     std::string *why);

} // namespace rr_dicom

#endif
