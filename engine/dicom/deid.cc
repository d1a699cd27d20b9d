// DICOM PS3.15 Annex E de-identification over DCMTK (dicom/deid.h).
#include "dicom/deid.h"

#include <dcmtk/config/osconfig.h>
#include <dcmtk/dcmdata/dcdeftag.h>
#include <dcmtk/dcmdata/dcfilefo.h>
#include <dcmtk/dcmdata/dcitem.h>
#include <dcmtk/dcmdata/dcsequen.h>
#include <dcmtk/oflog/oflog.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <string>
#include <unordered_map>
#include <vector>

#include <unistd.h>

#include "core/error.h"

namespace {

// What happens to an attribute named in the table (anything else falls to
// the rules by group and VR in walk()).
enum class Act {
  Keep,      // K: kept (sequences are walked)
  Remove,    // X
  Empty,     // Z: zero length
  PatientId, // D: pseudonym of the Patient ID
  Accession, // D: pseudonym of the Accession Number
  Age,       // K under Retain Patient Characteristics; over 89 years becomes 090Y
};

struct Rule {
  Uint16 group, element;
  Act act;
};

// DICOM PS3.15 Table E.1-1, the attributes of the CT, MR, CR, DX, MG, PET
// and NM image IODs and their common modules, Basic Profile with the
// Retain Patient Characteristics Option (sex, age, size, weight). UIDs
// (action U) are replaced by the rule for VR UI, PN/DA/DT/TM/LT/ST/UT are
// removed by their VR unless listed here as Empty; both are listed here
// only where the profile asks for something else.
const Rule kRules[] = {
    // patient
    {0x0010, 0x0010, Act::Empty},     // Patient's Name
    {0x0010, 0x0020, Act::PatientId}, // Patient ID
    {0x0010, 0x0021, Act::Remove},    // Issuer of Patient ID
    {0x0010, 0x0022, Act::Remove},    // Type of Patient ID
    {0x0010, 0x0024, Act::Remove},    // Issuer of Patient ID Qualifiers Sequence
    {0x0010, 0x0026, Act::Remove},    // Source Patient Group Identification Sequence
    {0x0010, 0x0027, Act::Remove},    // Group of Patients Identification Sequence
    {0x0010, 0x0030, Act::Empty},     // Patient's Birth Date
    {0x0010, 0x0032, Act::Remove},    // Patient's Birth Time
    {0x0010, 0x0033, Act::Remove},    // Patient's Birth Date in Alternative Calendar
    {0x0010, 0x0034, Act::Remove},    // Patient's Death Date in Alternative Calendar
    {0x0010, 0x0035, Act::Remove},    // Patient's Alternative Calendar
    {0x0010, 0x0040, Act::Keep},      // Patient's Sex (Retain Patient Characteristics)
    {0x0010, 0x0050, Act::Remove},    // Patient's Insurance Plan Code Sequence
    {0x0010, 0x0101, Act::Remove},    // Patient's Primary Language Code Sequence
    {0x0010, 0x0102, Act::Remove},    // Patient's Primary Language Modifier Code Sequence
    {0x0010, 0x1000, Act::Remove},    // Other Patient IDs
    {0x0010, 0x1001, Act::Remove},    // Other Patient Names
    {0x0010, 0x1002, Act::Remove},    // Other Patient IDs Sequence
    {0x0010, 0x1005, Act::Remove},    // Patient's Birth Name
    {0x0010, 0x1010, Act::Age},       // Patient's Age
    {0x0010, 0x1020, Act::Keep},      // Patient's Size
    {0x0010, 0x1030, Act::Keep},      // Patient's Weight
    {0x0010, 0x1040, Act::Remove},    // Patient's Address
    {0x0010, 0x1050, Act::Remove},    // Insurance Plan Identification
    {0x0010, 0x1060, Act::Remove},    // Patient's Mother's Birth Name
    {0x0010, 0x1080, Act::Remove},    // Military Rank
    {0x0010, 0x1081, Act::Remove},    // Branch of Service
    {0x0010, 0x1090, Act::Remove},    // Medical Record Locator
    {0x0010, 0x1100, Act::Remove},    // Referenced Patient Photo Sequence
    {0x0010, 0x2000, Act::Remove},    // Medical Alerts
    {0x0010, 0x2110, Act::Remove},    // Allergies
    {0x0010, 0x2150, Act::Remove},    // Country of Residence
    {0x0010, 0x2152, Act::Remove},    // Region of Residence
    {0x0010, 0x2154, Act::Remove},    // Patient's Telephone Numbers
    {0x0010, 0x2155, Act::Remove},    // Patient's Telecom Information
    {0x0010, 0x2160, Act::Remove},    // Ethnic Group
    {0x0010, 0x2180, Act::Remove},    // Occupation
    {0x0010, 0x21A0, Act::Remove},    // Smoking Status
    {0x0010, 0x21B0, Act::Remove},    // Additional Patient History
    {0x0010, 0x21C0, Act::Remove},    // Pregnancy Status
    {0x0010, 0x21D0, Act::Remove},    // Last Menstrual Date
    {0x0010, 0x21F0, Act::Remove},    // Patient's Religious Preference
    {0x0010, 0x2203, Act::Remove},    // Patient's Sex Neutered
    {0x0010, 0x2297, Act::Remove},    // Responsible Person
    {0x0010, 0x2299, Act::Remove},    // Responsible Organization
    {0x0010, 0x4000, Act::Remove},    // Patient Comments
    {0x0038, 0x0004, Act::Remove},    // Referenced Patient Alias Sequence
    {0x0038, 0x0010, Act::Remove},    // Admission ID
    {0x0038, 0x0014, Act::Remove},    // Issuer of Admission ID Sequence
    {0x0038, 0x001E, Act::Remove},    // Scheduled Patient Institution Residence
    {0x0038, 0x0060, Act::Remove},    // Service Episode ID
    {0x0038, 0x0061, Act::Remove},    // Issuer of Service Episode ID
    {0x0038, 0x0062, Act::Remove},    // Service Episode Description
    {0x0038, 0x0064, Act::Remove},    // Issuer of Service Episode ID Sequence
    {0x0038, 0x0300, Act::Remove},    // Current Patient Location
    {0x0038, 0x0400, Act::Remove},    // Patient's Institution Residence
    {0x0038, 0x0500, Act::Remove},    // Patient State
    {0x0038, 0x4000, Act::Remove},    // Visit Comments
    // study, visit, request
    {0x0008, 0x0020, Act::Empty},     // Study Date
    {0x0008, 0x0030, Act::Empty},     // Study Time
    {0x0008, 0x0023, Act::Empty},     // Content Date
    {0x0008, 0x0033, Act::Empty},     // Content Time
    {0x0008, 0x0050, Act::Accession}, // Accession Number
    {0x0008, 0x0051, Act::Remove},    // Issuer of Accession Number Sequence
    {0x0008, 0x0080, Act::Remove},    // Institution Name
    {0x0008, 0x0081, Act::Remove},    // Institution Address
    {0x0008, 0x0082, Act::Remove},    // Institution Code Sequence
    {0x0008, 0x0090, Act::Empty},     // Referring Physician's Name
    {0x0008, 0x0092, Act::Remove},    // Referring Physician's Address
    {0x0008, 0x0094, Act::Remove},    // Referring Physician's Telephone Numbers
    {0x0008, 0x0096, Act::Remove},    // Referring Physician Identification Sequence
    {0x0008, 0x009C, Act::Remove},    // Consulting Physician's Name
    {0x0008, 0x009D, Act::Remove},    // Consulting Physician Identification Sequence
    {0x0008, 0x0116, Act::Remove},    // Responsible Organization
    {0x0008, 0x0201, Act::Remove},    // Timezone Offset From UTC
    {0x0008, 0x1010, Act::Remove},    // Station Name
    {0x0008, 0x1030, Act::Remove},    // Study Description
    {0x0008, 0x1032, Act::Remove},    // Procedure Code Sequence
    {0x0008, 0x103E, Act::Remove},    // Series Description
    {0x0008, 0x1040, Act::Remove},    // Institutional Department Name
    {0x0008, 0x1041, Act::Remove},    // Institutional Department Type Code Sequence
    {0x0008, 0x1048, Act::Remove},    // Physician(s) of Record
    {0x0008, 0x1049, Act::Remove},    // Physician(s) of Record Identification Sequence
    {0x0008, 0x1050, Act::Remove},    // Performing Physician's Name
    {0x0008, 0x1052, Act::Remove},    // Performing Physician Identification Sequence
    {0x0008, 0x1060, Act::Remove},    // Name of Physician(s) Reading Study
    {0x0008, 0x1062, Act::Remove},    // Physician(s) Reading Study Identification Sequence
    {0x0008, 0x1070, Act::Remove},    // Operators' Name
    {0x0008, 0x1072, Act::Remove},    // Operator Identification Sequence
    {0x0008, 0x1080, Act::Remove},    // Admitting Diagnoses Description
    {0x0008, 0x1084, Act::Remove},    // Admitting Diagnoses Code Sequence
    {0x0008, 0x1110, Act::Remove},    // Referenced Study Sequence
    {0x0008, 0x1111, Act::Remove},    // Referenced Performed Procedure Step Sequence
    {0x0008, 0x1120, Act::Remove},    // Referenced Patient Sequence
    {0x0008, 0x2111, Act::Remove},    // Derivation Description
    {0x0008, 0x4000, Act::Remove},    // Identifying Comments
    {0x0018, 0x0010, Act::Empty},     // Contrast/Bolus Agent
    {0x0018, 0x1000, Act::Remove},    // Device Serial Number
    {0x0018, 0x1004, Act::Remove},    // Plate ID
    {0x0018, 0x1005, Act::Remove},    // Generator ID
    {0x0018, 0x1007, Act::Remove},    // Cassette ID
    {0x0018, 0x1008, Act::Remove},    // Gantry ID
    {0x0018, 0x100A, Act::Remove},    // UDI Sequence
    {0x0018, 0x1030, Act::Remove},    // Protocol Name
    {0x0018, 0x1400, Act::Remove},    // Acquisition Device Processing Description
    {0x0018, 0x4000, Act::Remove},    // Acquisition Comments
    {0x0018, 0x700A, Act::Remove},    // Detector ID
    {0x0018, 0x9185, Act::Remove},    // Respiratory Motion Compensation Technique Description
    {0x0018, 0x9371, Act::Remove},    // X-Ray Detector ID
    {0x0018, 0x9373, Act::Remove},    // X-Ray Detector Label
    {0x0018, 0x937B, Act::Remove},    // Multi-energy Acquisition Description
    {0x0018, 0x9424, Act::Remove},    // Acquisition Protocol Description
    {0x0018, 0xA001, Act::Remove},    // Contributing Equipment Sequence
    {0x0018, 0xA003, Act::Remove},    // Contribution Description
    {0x0020, 0x0010, Act::Empty},     // Study ID
    {0x0020, 0x3401, Act::Remove},    // Modifying Device ID
    {0x0020, 0x3404, Act::Remove},    // Modifying Device Manufacturer
    {0x0020, 0x3406, Act::Remove},    // Modified Image Description
    {0x0020, 0x4000, Act::Remove},    // Image Comments
    {0x0020, 0x9158, Act::Remove},    // Frame Comments
    {0x0028, 0x4000, Act::Remove},    // Image Presentation Comments
    {0x0032, 0x0012, Act::Remove},    // Study ID Issuer
    {0x0032, 0x1020, Act::Remove},    // Scheduled Study Location
    {0x0032, 0x1021, Act::Remove},    // Scheduled Study Location AE Title
    {0x0032, 0x1030, Act::Remove},    // Reason for Study
    {0x0032, 0x1032, Act::Remove},    // Requesting Physician
    {0x0032, 0x1033, Act::Remove},    // Requesting Service
    {0x0032, 0x1060, Act::Remove},    // Requested Procedure Description
    {0x0032, 0x1064, Act::Remove},    // Requested Procedure Code Sequence
    {0x0032, 0x1066, Act::Remove},    // Reason for Visit
    {0x0032, 0x1067, Act::Remove},    // Reason for Visit Code Sequence
    {0x0032, 0x1070, Act::Remove},    // Requested Contrast Agent
    {0x0032, 0x4000, Act::Remove},    // Study Comments
    {0x0040, 0x0001, Act::Remove},    // Scheduled Station AE Title
    {0x0040, 0x0006, Act::Remove},    // Scheduled Performing Physician's Name
    {0x0040, 0x000B, Act::Remove},    // Scheduled Performing Physician Identification Sequence
    {0x0040, 0x0010, Act::Remove},    // Scheduled Station Name
    {0x0040, 0x0011, Act::Remove},    // Scheduled Procedure Step Location
    {0x0040, 0x0241, Act::Remove},    // Performed Station AE Title
    {0x0040, 0x0242, Act::Remove},    // Performed Station Name
    {0x0040, 0x0243, Act::Remove},    // Performed Location
    {0x0040, 0x0253, Act::Remove},    // Performed Procedure Step ID
    {0x0040, 0x0254, Act::Remove},    // Performed Procedure Step Description
    {0x0040, 0x0275, Act::Remove},    // Request Attributes Sequence
    {0x0040, 0x0280, Act::Remove},    // Comments on the Performed Procedure Step
    {0x0040, 0x0555, Act::Remove},    // Acquisition Context Sequence
    {0x0040, 0x1001, Act::Remove},    // Requested Procedure ID
    {0x0040, 0x1002, Act::Remove},    // Reason for the Requested Procedure
    {0x0040, 0x1004, Act::Remove},    // Patient Transport Arrangements
    {0x0040, 0x1005, Act::Remove},    // Requested Procedure Location
    {0x0040, 0x1010, Act::Remove},    // Names of Intended Recipients of Results
    {0x0040, 0x1011, Act::Remove},    // Intended Recipients of Results Identification Sequence
    {0x0040, 0x1101, Act::Remove},    // Person Identification Code Sequence
    {0x0040, 0x1102, Act::Remove},    // Person's Address
    {0x0040, 0x1103, Act::Remove},    // Person's Telephone Numbers
    {0x0040, 0x1104, Act::Remove},    // Person's Telecom Information
    {0x0040, 0x1400, Act::Remove},    // Requested Procedure Comments
    {0x0040, 0x2001, Act::Remove},    // Reason for the Imaging Service Request
    {0x0040, 0x2008, Act::Remove},    // Order Entered By
    {0x0040, 0x2009, Act::Remove},    // Order Enterer's Location
    {0x0040, 0x2010, Act::Remove},    // Order Callback Phone Number
    {0x0040, 0x2011, Act::Remove},    // Order Callback Telecom Information
    {0x0040, 0x2016, Act::Remove},    // Placer Order Number / Imaging Service Request
    {0x0040, 0x2017, Act::Remove},    // Filler Order Number / Imaging Service Request
    {0x0040, 0x2400, Act::Remove},    // Imaging Service Request Comments
    {0x0040, 0x3001, Act::Remove},    // Confidentiality Constraint on Patient Data Description
    {0x0040, 0xA027, Act::Remove},    // Verifying Organization
    {0x0040, 0xA073, Act::Remove},    // Verifying Observer Sequence
    {0x0040, 0xA078, Act::Remove},    // Author Observer Sequence
    {0x0040, 0xA088, Act::Remove},    // Verifying Observer Identification Code Sequence
    {0x0040, 0xA730, Act::Remove},    // Content Sequence
    {0x0088, 0x0140, Act::Keep},      // Storage Media File-set UID (replaced as a UID)
    {0x0088, 0x0200, Act::Remove},    // Icon Image Sequence
    {0x0088, 0x0904, Act::Remove},    // Topic Title
    {0x0088, 0x0906, Act::Remove},    // Topic Subject
    {0x0088, 0x0910, Act::Remove},    // Topic Author
    {0x0088, 0x0912, Act::Remove},    // Topic Keywords
    {0x0400, 0x0100, Act::Remove},    // Digital Signature UID
    {0x0400, 0x0402, Act::Remove},    // Referenced Digital Signature Sequence
    {0x0400, 0x0403, Act::Remove},    // Referenced SOP Instance MAC Sequence
    {0x0400, 0x0550, Act::Remove},    // Modified Attributes Sequence
    {0x0400, 0x0561, Act::Remove},    // Original Attributes Sequence
    {0x4000, 0x0010, Act::Remove},    // Arbitrary
    {0x4000, 0x4000, Act::Remove},    // Text Comments
    {0xFFFA, 0xFFFA, Act::Remove},    // Digital Signatures Sequence
    // set again after the walk
    {0x0012, 0x0062, Act::Remove}, // Patient Identity Removed
    {0x0012, 0x0063, Act::Remove}, // De-identification Method
    {0x0012, 0x0064, Act::Remove}, // De-identification Method Code Sequence
    {0x0028, 0x0303, Act::Remove}, // Longitudinal Temporal Information Modified
};

// UIDs that name no instance: kept even when outside the DICOM root.
const Uint32 kKeepUids[] = {
    0x00080016, // SOP Class UID
    0x0008001A, // Related General SOP Class UID
    0x0008001B, // Original Specialized SOP Class UID
    0x0008010C, // Coding Scheme UID
    0x0008010D, // Context Group Extension Creator UID
    0x00080117, // Context UID
    0x00080118, // Mapping Resource UID
    0x00081150, // Referenced SOP Class UID
    0x0008115A, // SOP Classes Supported
    0x00041510, // Referenced SOP Class UID in File
};

// The image storage SOP classes the table above covers.
const char *const kSopClasses[] = {
    "1.2.840.10008.5.1.4.1.1.1",     // CR
    "1.2.840.10008.5.1.4.1.1.1.1",   // DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1", // DX for processing
    "1.2.840.10008.5.1.4.1.1.1.2",   // MG for presentation
    "1.2.840.10008.5.1.4.1.1.1.2.1", // MG for processing
    "1.2.840.10008.5.1.4.1.1.2",     // CT
    "1.2.840.10008.5.1.4.1.1.2.1",   // Enhanced CT
    "1.2.840.10008.5.1.4.1.1.2.2",   // Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4",     // MR
    "1.2.840.10008.5.1.4.1.1.4.1",   // Enhanced MR
    "1.2.840.10008.5.1.4.1.1.4.4",   // Legacy Converted Enhanced MR
    "1.2.840.10008.5.1.4.1.1.20",    // NM
    "1.2.840.10008.5.1.4.1.1.128",   // PET
    "1.2.840.10008.5.1.4.1.1.128.1", // Legacy Converted Enhanced PET
    "1.2.840.10008.5.1.4.1.1.130",   // Enhanced PET
};

const char kDicomRoot[] = "1.2.840.10008.";

struct Fail {
  int code;
  std::string text;
};

[[noreturn]] void fail(int code, const std::string &text) {
  throw Fail{code, text};
}

const std::unordered_map<Uint32, Act> &rules() {
  static const std::unordered_map<Uint32, Act> m = [] {
    std::unordered_map<Uint32, Act> r;
    for (const Rule &x : kRules)
      r.emplace((Uint32)x.group << 16 | x.element, x.act);
    return r;
  }();
  return m;
}

bool keep_uid_tag(Uint32 key) {
  for (Uint32 k : kKeepUids)
    if (k == key)
      return true;
  return false;
}

std::string hmac_sha256(const void *secret, size_t len, const std::string &msg) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  if (!HMAC(EVP_sha256(), secret, (int)len, reinterpret_cast<const unsigned char *>(msg.data()),
            msg.size(), md, &n) ||
      n < 16)
    fail(RR_EIO, "HMAC-SHA256 failed");
  return std::string(reinterpret_cast<const char *>(md), n);
}

std::string trimmed(const char *s) {
  std::string v(s ? s : "");
  while (!v.empty() && (v.back() == ' ' || v.back() == '\0'))
    v.pop_back();
  size_t b = 0;
  while (b < v.size() && v[b] == ' ')
    b++;
  return v.substr(b);
}

std::string pseudo_uid(const void *secret, size_t len, const std::string &uid) {
  std::string md = hmac_sha256(secret, len, uid);
  unsigned __int128 v = 0;
  for (size_t i = 0; i < 16; i++)
    v = v << 8 | (unsigned char)md[i];
  char digits[48];
  size_t n = 0;
  do {
    digits[n++] = (char)('0' + (int)(v % 10));
    v /= 10;
  } while (v);
  std::string out = "2.25.";
  while (n)
    out += digits[--n];
  return out;
}

std::string pseudo_text(const void *secret, size_t len, const char *kind,
                        const std::string &value) {
  if (value.empty())
    return "";
  std::string md = hmac_sha256(secret, len, std::string(kind) + ":" + value);
  static const char hexd[] = "0123456789ABCDEF";
  std::string out = "RR";
  for (size_t i = 0; i < 7; i++) {
    out += hexd[(unsigned char)md[i] >> 4];
    out += hexd[(unsigned char)md[i] & 15];
  }
  return out;
}

struct Walker {
  const void *secret;
  size_t len;
  rr_dicom_deid_uid_fn cb;
  void *ud;
  unsigned removed = 0;
  std::unordered_map<std::string, std::string> uids; // original -> pseudonym

  const std::string &uid(const std::string &orig) {
    auto it = uids.find(orig);
    if (it == uids.end())
      it = uids.emplace(orig, pseudo_uid(secret, len, orig)).first;
    if (cb)
      cb(ud, orig.c_str(), it->second.c_str());
    return it->second;
  }

  void put(DcmElement *el, const std::string &v) {
    if (el->putString(v.c_str()).bad())
      fail(RR_DICOM_EDCMTK, "cannot set a value");
  }

  void replace_uids(DcmElement *el) {
    OFString all;
    if (el->getOFStringArray(all).bad() || all.empty())
      return;
    std::string in(all.c_str()), out;
    size_t start = 0;
    bool changed = false;
    while (start <= in.size()) {
      size_t bs = in.find('\\', start);
      std::string one = trimmed(
          in.substr(start, bs == std::string::npos ? std::string::npos : bs - start).c_str());
      if (!out.empty() || start > 0)
        out += '\\';
      if (!one.empty() && one.compare(0, sizeof kDicomRoot - 1, kDicomRoot) != 0) {
        out += uid(one);
        changed = true;
      } else {
        out += one;
      }
      if (bs == std::string::npos)
        break;
      start = bs + 1;
    }
    if (changed)
      put(el, out);
  }

  void walk(DcmItem *item) {
    for (unsigned long i = item->card(); i-- > 0;) {
      DcmElement *el = item->getElement(i);
      if (!el)
        continue;
      const DcmTag &tag = el->getTag();
      Uint16 g = tag.getGroup(), e = tag.getElement();
      Uint32 key = (Uint32)g << 16 | e;
      DcmEVR vr = el->ident();
      bool remove = (g & 1) != 0                                        // private
                    || (g & 0xFF00) == 0x6000 || (g & 0xFF00) == 0x5000 // overlays, curves
                    || g == 0x4008;                                     // results
      Act act = Act::Keep;
      auto r = rules().find(key);
      if (!remove && r != rules().end()) {
        act = r->second;
        remove = act == Act::Remove;
      } else if (!remove) {
        remove = vr == EVR_PN || vr == EVR_DA || vr == EVR_DT || vr == EVR_TM || vr == EVR_LT ||
                 vr == EVR_ST || vr == EVR_UT || vr == EVR_UN;
      }
      if (remove) {
        delete item->remove(i);
        removed++;
        continue;
      }
      OFString v;
      switch (act) {
      case Act::Empty:
        if (el->getLength() > 0 || vr == EVR_SQ) {
          el->clear();
          removed++;
        }
        continue;
      case Act::PatientId:
      case Act::Accession:
        if (el->getOFStringArray(v).good() && !trimmed(v.c_str()).empty()) {
          put(el, pseudo_text(secret, len, act == Act::PatientId ? "patient_id" : "accession",
                              trimmed(v.c_str())));
          removed++;
        }
        continue;
      case Act::Age:
        if (el->getOFString(v, 0).good() && v.length() == 4 && v[3] == 'Y' &&
            strtol(v.c_str(), nullptr, 10) > 89)
          put(el, "090Y");
        continue;
      default: break;
      }
      if (vr == EVR_UI && !keep_uid_tag(key))
        replace_uids(el);
      else if (vr == EVR_SQ) {
        DcmSequenceOfItems *sq = OFstatic_cast(DcmSequenceOfItems *, el);
        for (unsigned long k = 0; k < sq->card(); k++)
          walk(sq->getItem(k));
      }
    }
  }
};

void set(DcmItem *item, const DcmTagKey &key, const char *value) {
  if (item->putAndInsertString(DcmTag(key), value).bad())
    fail(RR_DICOM_EDCMTK, "cannot set an attribute");
}

void add_code(DcmDataset *ds, const char *value, const char *meaning) {
  DcmItem *it = nullptr;
  if (ds->findOrCreateSequenceItem(DCM_DeidentificationMethodCodeSequence, it, -2).bad() || !it)
    fail(RR_DICOM_EDCMTK, "cannot add a de-identification method code");
  set(it, DCM_CodeValue, value);
  set(it, DCM_CodingSchemeDesignator, "DCM");
  set(it, DCM_CodeMeaning, meaning);
}

void copy(char *out, size_t cap, const std::string &s) {
  snprintf(out, cap, "%s", s.c_str());
}

std::string get(DcmDataset *ds, const DcmTagKey &key) {
  OFString v;
  if (ds->findAndGetOFString(key, v).bad())
    return "";
  return trimmed(v.c_str());
}

int deid_file(const char *in_path, const char *out_path, const void *secret, size_t len,
              rr_dicom_deid_uid_fn cb, void *ud, rr_dicom_deid_info_t *info) {
  static std::once_flag once;
  std::call_once(once, [] { OFLog::configure(OFLogger::ERROR_LOG_LEVEL); });
  if (!secret || !len)
    fail(RR_EINVAL, "no de-identification secret");
  DcmFileFormat ff;
  OFCondition c = ff.loadFile(OFFilename(in_path));
  if (c.bad())
    fail(RR_EPARSE, std::string("not a DICOM file: ") + c.text());
  DcmDataset *ds = ff.getDataset();
  std::string sop_class = get(ds, DCM_SOPClassUID);
  copy(info->study_uid, sizeof info->study_uid, get(ds, DCM_StudyInstanceUID));
  copy(info->series_uid, sizeof info->series_uid, get(ds, DCM_SeriesInstanceUID));
  copy(info->sop_uid, sizeof info->sop_uid, get(ds, DCM_SOPInstanceUID));
  copy(info->modality, sizeof info->modality, get(ds, DCM_Modality));
  if (!info->sop_uid[0] || !info->study_uid[0] || !info->series_uid[0])
    fail(RR_EPARSE, "no Study, Series or SOP Instance UID");
  bool covered = false;
  for (const char *k : kSopClasses)
    covered = covered || sop_class == k;
  if (!covered)
    fail(RR_DICOM_EREFUSED, "SOP class " + sop_class + " is not covered by the de-identifier");
  std::string burned = get(ds, DCM_BurnedInAnnotation);
  for (char &ch : burned)
    ch = (char)toupper((unsigned char)ch);
  if (burned == "YES")
    fail(RR_DICOM_EREFUSED, "Burned In Annotation is YES");

  Walker w{secret, len, cb, ud, 0, {}};
  w.walk(ds);
  set(ds, DCM_PatientIdentityRemoved, "YES");
  set(ds, DCM_DeidentificationMethod,
      "radrelay: PS3.15 E.1 Basic Profile; Retain Patient Characteristics (sex, age, size, "
      "weight)");
  add_code(ds, "113100", "Basic Application Confidentiality Profile");
  add_code(ds, "113108", "Retain Patient Characteristics Option");
  set(ds, DCM_LongitudinalTemporalInformationModified, "REMOVED");
  copy(info->pseudo_study_uid, sizeof info->pseudo_study_uid, get(ds, DCM_StudyInstanceUID));
  copy(info->pseudo_series_uid, sizeof info->pseudo_series_uid, get(ds, DCM_SeriesInstanceUID));
  copy(info->pseudo_sop_uid, sizeof info->pseudo_sop_uid, get(ds, DCM_SOPInstanceUID));
  info->removed = w.removed;

  std::string tmp = std::string(out_path) + ".tmp";
  // The meta header is made anew (EWM_createNewMeta): source and sending
  // AE titles go, the Media Storage SOP Instance UID follows the dataset.
  c = ff.saveFile(OFFilename(tmp.c_str()), EXS_Unknown, EET_ExplicitLength, EGL_recalcGL,
                  EPD_noChange, 0, 0, EWM_createNewMeta);
  if (c.bad()) {
    unlink(tmp.c_str());
    fail(RR_DICOM_EDCMTK, std::string("cannot write the de-identified copy: ") + c.text());
  }
  if (rename(tmp.c_str(), out_path) != 0) {
    int e = errno;
    unlink(tmp.c_str());
    fail(-e, std::string("cannot rename the de-identified copy: ") + strerror(e));
  }
  return 0;
}

} // namespace

extern "C" int rr_dicom_deid_uid(const void *secret, size_t len, const char *uid,
                                 char out[RR_DICOM_DEID_UID_MAX]) {
  out[0] = '\0';
  try {
    std::string u = trimmed(uid);
    if (!secret || !len || u.empty())
      return RR_EINVAL;
    copy(out, RR_DICOM_DEID_UID_MAX, pseudo_uid(secret, len, u));
    return 0;
  } catch (const Fail &f) {
    return f.code;
  } catch (...) {
    return RR_ENOMEM;
  }
}

extern "C" int rr_dicom_deid_text(const void *secret, size_t len, const char *kind,
                                  const char *value, char *out, size_t cap) {
  if (cap < 17 || !kind)
    return RR_EINVAL;
  out[0] = '\0';
  try {
    if (!secret || !len)
      return RR_EINVAL;
    copy(out, cap, pseudo_text(secret, len, kind, trimmed(value)));
    return 0;
  } catch (const Fail &f) {
    return f.code;
  } catch (...) {
    return RR_ENOMEM;
  }
}

extern "C" int rr_dicom_deid_file(const char *in_path, const char *out_path, const void *secret,
                                  size_t len, rr_dicom_deid_uid_fn uid_cb, void *ud,
                                  rr_dicom_deid_info_t *info) {
  memset(info, 0, sizeof *info);
  try {
    return deid_file(in_path, out_path, secret, len, uid_cb, ud, info);
  } catch (const Fail &f) {
    snprintf(info->why, sizeof info->why, "%s", f.text.c_str());
    return f.code;
  } catch (const std::bad_alloc &) {
    snprintf(info->why, sizeof info->why, "out of memory");
    return RR_ENOMEM;
  } catch (...) {
    snprintf(info->why, sizeof info->why, "internal error");
    return RR_DICOM_EINTERNAL;
  }
}
