-- reports: results and signed reports from the RIS (ORU^R01).
--
-- Final reports (OBR-25 F) and corrected ones (C) are what an AI finding is
-- confirmed or overridden against. For each report (OBR) about a study
-- with AI findings (found by accession number, OBR-18 or OBR-3, or by the
-- Study Instance UID in an OBX 113014), the rule in lib/verdict_rules.lua
-- decides per finding, with the terms of finding_terms.csv, and
-- ai.verdict records it with this message (the signing radiologist,
-- OBR-32, as who decided); a corrected report's verdict replaces the
-- final one's. The report also goes to the AI audit as a JSON record.
-- Preliminary results (P), among them the AI results radrelay itself sends
-- to the RIS, are kept in the journal only.
local rad = require("radiology")
local rules = require("verdict_rules")

local terms = lookup.load("finding_terms.csv")

-- The AI findings a report is about: by Study Instance UID and by each of
-- its accession numbers.
local function findings_of(report)
  local seen, out = {}, {}
  local function add(list)
    for _, f in ipairs(list) do
      local key = f.job_id .. "/" .. f.finding_id
      if not seen[key] then
        seen[key] = true
        out[#out + 1] = f
      end
    end
  end
  if report.study_uid and report.study_uid ~= "" then
    add(ai.findings{study_uid = report.study_uid})
  end
  for _, acc in ipairs(report.accessions) do
    add(ai.findings{accession = acc})
  end
  return out
end

local function signed(report)
  return report.status == "F" or report.status == "C"
end

function on_message(msg, ctx)
  local reports = rules.reports(msg)
  local any = false
  for _, report in ipairs(reports) do any = any or signed(report) end
  if not any then
    ctx:filter("not a final report (OBR-25 " .. (msg:get("OBR-25") or "") .. ")")
    return
  end
  if msg:get("MSH-3.1") == "RADRELAY" then
    ctx:filter("radrelay's own message")
    return
  end
  local status = reports[1].status
  local control_id = msg:get("MSH-10")
  -- Decide everything first, then record: an error while deciding records
  -- nothing.
  local decided = {}
  for _, report in ipairs(reports) do
    if signed(report) then
      local findings = findings_of(report)
      if #findings > 0 then
        for _, d in ipairs(rules.decide(msg, report, findings, terms)) do
          d.by = report.radiologist ~= "" and report.radiologist or nil
          decided[#decided + 1] = d
        end
      end
    end
  end
  local verdicts = {}
  local confirmed, overridden = 0, 0
  for _, d in ipairs(decided) do
    local f = d.finding
    local outcome = ai.verdict(f.job_id, f.finding_id, d.verdict,
                               {by = d.by, note = d.note, report = control_id})
    if d.verdict == "confirmed" then confirmed = confirmed + 1 else overridden = overridden + 1 end
    verdicts[#verdicts + 1] = {
      job_id = f.job_id,
      finding_id = f.finding_id,
      endpoint = f.endpoint,
      model = f.model,
      code = f.code,
      verdict = d.verdict,
      outcome = outcome,
      note = d.note,
    }
  end
  if #decided > 0 then
    ctx:log("info", "ai verdicts", "confirmed=" .. confirmed, "overridden=" .. overridden)
  end
  local study_uid
  for i = 1, msg:count("OBX") do
    if msg:get("OBX[" .. i .. "]-3.1") == "113014" then
      study_uid = msg:get("OBX[" .. i .. "]-5")
    end
  end
  ctx:route("report_verdicts", {
    accession = rad.accession(msg),
    mrn = rad.mrn(msg),
    study_uid = study_uid,
    status = status == "C" and "corrected" or status == "F" and "final" or status,
    observed = msg:get("OBR-7"),
    radiologist = msg:get("OBR-32.1.1"),
    ai_findings = #verdicts > 0 and json.array(verdicts) or nil,
  })
end
