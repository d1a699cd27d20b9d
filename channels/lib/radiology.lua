-- Shared helpers for the bundled radiology channels (require "radiology").
local M = {}

-- Order priority from the places RIS systems put it: ORC-7.6 (v2.3-2.4),
-- TQ1-9 (v2.5+), OBR-27.6. Returns "STAT", "ASAP" or "ROUTINE".
function M.priority(msg)
  local p = msg:get("ORC-7.6")
  if p == nil or p == "" then p = msg:get("TQ1-9.1") end
  if p == nil or p == "" then p = msg:get("OBR-27.6") end
  p = (p or ""):upper()
  if p == "S" or p == "STAT" then return "STAT" end
  if p == "A" or p == "ASAP" then return "ASAP" end
  return "ROUTINE"
end

-- The accession number: OBR-18 (ORM), IPC-1 (OMI), else the filler order number.
function M.accession(msg)
  for _, path in ipairs({"OBR-18.1", "IPC-1.1", "ORC-3.1", "OBR-3.1"}) do
    local v = msg:get(path)
    if v and v ~= "" and v ~= '""' then return v end
  end
  return nil
end

-- The patient's MRN: the PID-3 repetition typed MR, else the first.
function M.mrn(msg)
  local n = msg:repetitions("PID-3")
  for i = 1, n do
    if msg:get("PID-3[" .. i .. "].5") == "MR" then return msg:get("PID-3[" .. i .. "].1") end
  end
  return msg:get("PID-3.1")
end

local function first(msg, paths)
  for _, path in ipairs(paths) do
    local v = msg:get(path)
    if v and v ~= "" and v ~= '""' then return v end
  end
  return nil
end

-- The order record the engine keeps (orders.keep) from an ORM^O01 or
-- OMI^O23: the fields the study tracker matches on (accession, Study
-- Instance UID, MRN + modality + time) and what routing and results need.
-- patient: what the ADT feed said about the patient (a table), or nil.
function M.order(msg, patient)
  local provider = first(msg, {"ORC-12.1", "OBR-16.1"})
  return {
    accession = M.accession(msg),
    placer_order = first(msg, {"ORC-2.1", "OBR-2.1"}),
    filler_order = first(msg, {"ORC-3.1", "OBR-3.1"}),
    order_control = msg:get("ORC-1"),
    order_status = first(msg, {"ORC-5"}),
    mrn = M.mrn(msg),
    patient = patient or json.null,
    patient_class = first(msg, {"PV1-2"}),
    procedure = {
      code = first(msg, {"OBR-4.1", "IPC-7.1"}),
      text = first(msg, {"OBR-4.2", "IPC-7.2"}),
      system = first(msg, {"OBR-4.3", "IPC-7.3"}),
    },
    modality = first(msg, {"OBR-24", "IPC-5.1"}),
    priority = M.priority(msg),
    reason = first(msg, {"OBR-31.2", "OBR-31.1", "OBR-13"}),
    ordering_provider = provider and {
      id = provider,
      family = first(msg, {"ORC-12.2", "OBR-16.2"}),
      given = first(msg, {"ORC-12.3", "OBR-16.3"}),
    } or json.null,
    study_uid = first(msg, {"ZDS-1.1", "IPC-3.1"}),
    ordered_at = first(msg, {"ORC-9", "MSH-7"}),
    scheduled_at = first(msg, {"TQ1-7.1", "ORC-7.4", "OBR-27.4", "OBR-7", "OBR-6"}),
  }
end

-- ORU^R01 with an AI result, for the RIS/EHR: OBR-25 P (preliminary, not
-- a radiologist's report), one OBX per finding (OBX-8 AA when critical),
-- the model's name and version, the Study Instance UID as
-- OBX|n|ST|113014^DICOM Study^DCM. result: what on_result gets
-- (result.result, result.study, result.job).
function M.ai_oru(r, control_id)
  local study, res = r.study, r.result
  local order = study ~= json.null and study.order ~= json.null and study.order or {}
  local m = hl7.new("2.5.1")
  m:set("MSH-3", "RADRELAY")
  m:set("MSH-4", "RADRELAY")
  m:set("MSH-5", "RIS")
  m:set("MSH-7", hl7.now())
  m:set("MSH-9", "ORU")
  m:set("MSH-9.2", "R01")
  m:set("MSH-9.3", "ORU_R01")
  m:set("MSH-10", control_id)
  m:set("MSH-11", "P")
  m:add_segment("PID|1")
  m:set("PID-3.1", order.mrn or study.patient_id or "")
  m:set("PID-3.5", "MR")
  m:add_segment("OBR|1")
  m:set("OBR-2", order.placer_order or "")
  m:set("OBR-3", order.filler_order or "")
  local proc = order.procedure or {}
  m:set("OBR-4.1", proc.code or "")
  m:set("OBR-4.2", proc.text or "")
  m:set("OBR-18", study.accession ~= json.null and study.accession or "")
  m:set("OBR-22", hl7.now())
  m:set("OBR-25", "P")
  local n = 0
  local function obx(vt, code, meaning, system, value, flag)
    n = n + 1
    m:add_segment("OBX|" .. n)
    local p = "OBX[" .. n .. "]"
    m:set(p .. "-2", vt)
    m:set(p .. "-3.1", code)
    m:set(p .. "-3.2", meaning)
    m:set(p .. "-3.3", system)
    m:set(p .. "-5", value)
    if flag then m:set(p .. "-8", flag) end
    m:set(p .. "-11", "P")
  end
  obx("ST", "113014", "DICOM Study", "DCM", study.study_uid)
  obx("ST", "AI_MODEL", "AI model", "L", res.model.name .. " " .. res.model.version)
  local findings = res.findings or {}
  if #findings == 0 then
    obx("ST", "AI_RESULT", "AI result", "L", res.status == "completed" and "no findings" or res.status)
  end
  for _, f in ipairs(findings) do
    local text = (f.label or f.code.meaning)
    if f.confidence then text = text .. string.format(" (confidence %.2f)", f.confidence) end
    obx("ST", f.code.code, f.code.meaning, f.code.system, text, f.critical and "AA" or "N")
  end
  return m
end

-- ORM^O01 order update raising the priority of a study's order (ORC-1 XO,
-- ORC-7.6 / TQ1-9 S) with a sub-queue flag for the reading worklist.
function M.priority_update(order, control_id, flag)
  local m = hl7.new("2.5.1")
  m:set("MSH-3", "RADRELAY")
  m:set("MSH-4", "RADRELAY")
  m:set("MSH-5", "RIS")
  m:set("MSH-7", hl7.now())
  m:set("MSH-9", "ORM")
  m:set("MSH-9.2", "O01")
  m:set("MSH-10", control_id)
  m:set("MSH-11", "P")
  m:add_segment("PID|1")
  m:set("PID-3.1", order.mrn or "")
  m:set("PID-3.5", "MR")
  m:add_segment("ORC|XO")
  m:set("ORC-2", order.placer_order or "")
  m:set("ORC-3", order.filler_order or "")
  m:set("ORC-7.6", "S")
  m:add_segment("OBR|1")
  m:set("OBR-2", order.placer_order or "")
  m:set("OBR-3", order.filler_order or "")
  m:set("OBR-18", order.accession or "")
  m:set("OBR-27.6", "S")
  m:add_segment("ZRR|" .. flag)
  return m
end

return M
